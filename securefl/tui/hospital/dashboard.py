"""The hospital's home screen: connection, versions, round phase, local data.

Attributes down: the app sets ``connection``, ``status``, ``local`` and ``stale`` (through
``show``) when it learns something; the screen only renders them, also when they arrive
before it is mounted.  Its buttons and keys open the action screens through the app's
actions, so the footer, the mouse, the keys and the command palette do the same thing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, Static

from securefl.client.hospital import LocalState
from securefl.client.outbox import SendRecord
from securefl.client.session import ServerStatus
from securefl.ml.settings import clinical_name
from securefl.tui.common import clock

HERE = Path(__file__).parent

#: (action, button label, key, footer label): short footer labels so all fit in 80 columns.
ACTIONS = [("train", "Train", "t", "Train"), ("send", "Send weights", "s", "Send"),
           ("get", "Get weights", "g", "Get"), ("classify", "Classify scan", "c", "Classify"),
           ("history", "History", "h", "History"), ("logout", "Log out", "q", "Log out")]


def describe_local(state: LocalState, downloaded: int | None,
                   record: SendRecord | None = None) -> str:
    if state.base_version is None and not state.trained:
        base = "no model yet (next: press g to get the global weights)"
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
        updates = "update" if status.collected == 1 else "updates"
        phase = (f"Round {status.round_id}: {status.phase} — {len(status.joined)} joined, "
                 f"{status.collected} {updates} received")
    online = f" · {len(status.online)} hospital(s) online"
    return f"Global version on server: {status.version}", phase + online


def no_scans_warning(summary: dict[str, dict[str, int]], scans_dir: Path | None) -> str:
    """A sentence when training or testing would find nothing, else ''."""
    where = f" in {scans_dir}" if scans_dir is not None else ""
    missing = [split for split in ("Training", "Testing")
               if not sum(summary.get(split, {}).values())]
    if not missing:
        return ""
    return (f"No {' or '.join(s.lower() for s in missing)} scans found{where}: put them in "
            f"{' and '.join(s + '/<class>/' for s in missing)} (see the quick start), then "
            "press r.")


class DashboardScreen(Screen):
    CSS_PATH = HERE / "dashboard.tcss"
    TITLE = "Dashboard"
    HELP = ("The hospital's home screen: the connection to the federation's server, the "
            "global model on the server and this hospital's local model, the round in "
            "progress and the scans per class.  A week's routine: g (get the global "
            "weights and see how they do on your validation scans), t (train on your scans), "
            "s (send the masked update), then g again once the round is published.\n"
            "Greyed lines marked 'stale' are the last known values while the server cannot "
            "be reached; the app reconnects by itself.")
    # Refresh is off the footer (the app reconnects by itself) so that "? Help" fits.
    BINDINGS: ClassVar[list[BindingType]] = [
        *((key, f"app.{action}", short) for action, _, key, short in ACTIONS),
        Binding("r", "app.reconnect", "Refresh", show=False),
        Binding("a", "app.agent", "Agent", show=False)]  # the hospital's agent, if it runs

    def __init__(self, hospital_name: str, summary: dict[str, dict[str, int]],
                 scans_dir: Path | None = None) -> None:
        super().__init__()
        self.hospital_name, self.summary, self.scans_dir = hospital_name, summary, scans_dir
        self.connection = "Not connected"
        self.status: ServerStatus | None = None
        self.local = "Local model: unknown"
        self.stale = False
        self.as_of = ""  # when the status shown was last fresh

    _UNSET = object()

    def show(self, *, connection: str | None = None, status: object = _UNSET,
             local: str | None = None, stale: bool | None = None,
             summary: dict[str, dict[str, int]] | None = None) -> None:
        """Set what the app learnt; redraw if mounted (else ``on_mount`` draws it)."""
        if connection is not None:
            self.connection = connection
        if status is not self._UNSET and status is not None:
            self.status = status  # type: ignore[assignment]
            self.as_of = clock()
            self.stale = False
        if stale is not None:
            self.stale = stale
        if local is not None:
            self.local = local
        if summary is not None and summary != self.summary:
            self.summary = summary
            if self.is_mounted:
                with contextlib.suppress(NoMatches):  # the app is closing: its widgets go
                    self._fill_table()
        if self.is_mounted:
            # A status refresh that lands while the app exits finds its widgets removed
            # (it ended a test run with NoMatches, as it once did in the admin's app).
            with contextlib.suppress(NoMatches):
                self._draw()

    def _draw(self) -> None:
        version, phase = describe_status(self.status)
        if self.stale and self.status is not None:
            version += f" (stale: as of {self.as_of})"
            phase += " (stale)"
        self.query_one("#connection", Static).update(self.connection)
        self.query_one("#global", Static).update(version)
        self.query_one("#phase", Static).update(phase)
        self.query_one("#local", Static).update(self.local)
        self.query_one("#server-info").set_class(self.stale, "stale")
        self.query_one("#connection").set_class(self.stale, "offline")

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with VerticalScroll(id="info"):
                yield Static(f"Hospital: {self.hospital_name}", id="hospital", markup=False)
                yield Static(self.connection, id="connection", markup=False)
                with Vertical(id="server-info"):
                    yield Static("", id="global", markup=False)
                    yield Static("", id="phase", markup=False)
                yield Static(self.local, id="local", markup=False)
                yield Static("", id="no-scans", markup=False)
                yield DataTable(id="data", cursor_type="none", zebra_stripes=True)
            with VerticalScroll(id="actions"):
                for action, label, key, _ in ACTIONS:
                    yield Button(f"{label} ({key})", id=action)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#data", DataTable).add_columns("Class", "Training", "Testing")
        self._fill_table()
        self._draw()

    def _fill_table(self) -> None:
        table = self.query_one("#data", DataTable)
        table.clear()
        train, test = self.summary.get("Training", {}), self.summary.get("Testing", {})
        for cls in train:
            table.add_row(clinical_name(cls), str(train[cls]), str(test.get(cls, 0)))
        table.add_row("total", str(sum(train.values())), str(sum(test.values())))
        warning = no_scans_warning(self.summary, self.scans_dir)
        self.query_one("#no-scans", Static).update(warning)
        self.query_one("#no-scans", Static).display = bool(warning)

    async def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id:
            await self.app.run_action(event.button.id)
