"""The hospital's home screen: connection, versions, round phase, local data.

Attributes down: the app sets ``connection``, ``status`` and ``local`` (through ``show``)
when it learns something; the screen only renders them, also when they arrive before it is
mounted.  Its buttons and keys open the action screens
through the app's actions, so the footer, the mouse and the keys do the same thing.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, Static

from securefl.client.hospital import LocalState
from securefl.client.outbox import SendRecord
from securefl.client.session import ServerStatus

HERE = Path(__file__).parent

#: (action, button label, key, footer label): short footer labels so all fit in 80 columns.
ACTIONS = [("train", "Train", "t", "Train"), ("send", "Send weights", "s", "Send"),
           ("get", "Get weights", "g", "Get"), ("classify", "Classify scan", "c", "Classify"),
           ("history", "History", "h", "History"), ("logout", "Log out", "q", "Log out")]


def describe_local(state: LocalState, downloaded: int | None,
                   record: SendRecord | None = None) -> str:
    if state.base_version is None and not state.trained:
        base = "no model yet (press g to get the global weights)"
    elif state.base_version is None:
        base = "trained from scratch (not from a global version)"
    else:
        base = f"based on global version {state.base_version}"
    trained = f", trained on {state.num_samples} scans" if state.trained else ", not trained yet"
    got = f"; last download: version {downloaded}" if downloaded is not None else ""
    sent = ""
    if record is not None and record.base_version == state.base_version:
        if record.stage == "published":
            sent = f"; its update is in version {record.published_version}"
        elif record.pending_round is not None:
            sent = f"; its update went out in round {record.pending_round}"
    return f"Local model: {base}{trained}{got}{sent}"


def describe_status(status: ServerStatus | None) -> tuple[str, str]:
    if status is None:
        return "Global version on server: unknown", "Round: unknown"
    if status.phase == "idle":
        phase = "Round: none in progress"
    else:
        phase = (f"Round {status.round_id}: {status.phase} — {len(status.joined)} joined, "
                 f"{status.collected} updates collected")
    online = f" · {len(status.online)} hospital(s) online"
    return f"Global version on server: {status.version}", phase + online


class DashboardScreen(Screen):
    CSS_PATH = HERE / "dashboard.tcss"
    BINDINGS = [(key, f"app.{action}", short) for action, _, key, short in ACTIONS] + [
        ("r", "app.reconnect", "Refresh")]

    def __init__(self, hospital_name: str, summary: dict[str, dict[str, int]]) -> None:
        super().__init__()
        self.hospital_name, self.summary = hospital_name, summary
        self.connection = "Not connected"
        self.status: ServerStatus | None = None
        self.local = "Local model: unknown"

    _UNSET = object()

    def show(self, *, connection: str | None = None, status: object = _UNSET,
             local: str | None = None) -> None:
        """Set what the app learnt; redraw if mounted (else ``on_mount`` draws it)."""
        if connection is not None:
            self.connection = connection
        if status is not self._UNSET:
            self.status = status  # type: ignore[assignment]
        if local is not None:
            self.local = local
        if self.is_mounted:
            self._draw()

    def _draw(self) -> None:
        version, phase = describe_status(self.status)
        self.query_one("#connection", Static).update(self.connection)
        self.query_one("#global", Static).update(version)
        self.query_one("#phase", Static).update(phase)
        self.query_one("#local", Static).update(self.local)

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="info"):
                yield Static(f"Hospital: {self.hospital_name}", id="hospital")
                yield Static(self.connection, id="connection")
                yield Static("", id="global")
                yield Static(self.local, id="local")
                yield Static("", id="phase")
                yield DataTable(id="data", cursor_type="none", zebra_stripes=True)
            with Vertical(id="actions"):
                for action, label, key, _ in ACTIONS:
                    yield Button(f"{label} ({key})", id=action)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#data", DataTable)
        table.add_columns("Class", "Training", "Testing")
        train, test = self.summary.get("Training", {}), self.summary.get("Testing", {})
        for cls in train:
            table.add_row(cls, str(train[cls]), str(test.get(cls, 0)))
        table.add_row("total", str(sum(train.values())), str(sum(test.values())))
        self._draw()

    async def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id:
            await self.app.run_action(event.button.id)
