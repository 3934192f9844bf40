"""The administrator's live dashboard: version, round phase, k of n, hospitals table.

Attributes down: the app sets ``status``, ``hospitals`` and ``activity``; the screen renders.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static

from securefl.client.session import HospitalInfo, ServerStatus

HERE = Path(__file__).parent


COLUMNS = [("Hospital", 14), ("Online", 6), ("Joined", 6), ("Submitted", 9),
           ("Last seen (UTC)", 19), ("Cert expires", 12)]


def short_time(iso: str) -> str:
    """'2026-11-28T21:03:07+00:00' -> '2026-11-28 21:03:07'; '' -> 'never'."""
    return iso.replace("T", " ")[:19] if iso else "never"


def describe(status: ServerStatus | None) -> tuple[str, str]:
    if status is None:
        return "Global version: unknown", "Round: unknown (not connected)"
    if status.phase == "idle":
        round_text = "Round: none in progress · weight sets collected 0"
    else:
        round_text = (f"Round {status.round_id}: {status.phase} · weight sets collected "
                      f"{status.collected} of {len(status.joined)} joined")
    if status.waiting_for:
        # A round on this version failed after its survivor list went out: only the
        # hospitals on it can go on, so say which are missing.
        round_text += f" · waiting for {', '.join(status.waiting_for)}"
    return (f"Global version: {status.version} · {len(status.online)} hospital(s) online",
            round_text)


def yes(flag: bool) -> str:
    return "yes" if flag else "-"


class AdminDashboard(Screen):
    CSS_PATH = HERE / "dashboard.tcss"
    BINDINGS = [("a", "app.aggregate", "Aggregate"), ("e", "app.close_enrolment", "Close"),
                ("x", "app.abort", "Abort"), ("v", "app.versions", "Versions"),
                ("l", "app.audit", "Audit"), ("r", "app.refresh", "Refresh"),
                ("q", "app.logout", "Log out")]

    def __init__(self) -> None:
        super().__init__()
        self.connection = "Not connected"
        self.status: ServerStatus | None = None
        self.hospitals: tuple[HospitalInfo, ...] = ()
        self.activity = ""
        #: (done, total) for the activity's bar; None: an indeterminate bar.
        self.progress: tuple[int, int] | None = None

    _UNSET = object()

    def show(self, *, connection: str | None = None, status: object = _UNSET,
             hospitals: tuple[HospitalInfo, ...] | None = None,
             activity: str | None = None, progress: tuple[int, int] | None = None) -> None:
        """Set what the app learnt; redraw if mounted (else ``on_mount`` draws it).

        A new ``activity`` without ``progress`` makes the bar indeterminate again."""
        if connection is not None:
            self.connection = connection
        if status is not self._UNSET:
            self.status = status  # type: ignore[assignment]
        if hospitals is not None:
            self.hospitals = hospitals
            if self.is_mounted:
                self._fill_table()
        if activity is not None:
            self.activity = activity
            self.progress = progress
        if self.is_mounted:
            self._draw()

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="main"):
            yield Static(self.connection, id="connection")
            yield Static("", id="version")
            yield Static("", id="round")
            yield DataTable(id="hospitals", cursor_type="row", zebra_stripes=True)
            yield Static("", id="activity")
            yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="busy")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#hospitals", DataTable)
        for label, width in COLUMNS:  # fixed widths: the rows change every refresh
            table.add_column(label, width=width)
        self._fill_table()
        self._draw()

    def _draw(self) -> None:
        version, round_text = describe(self.status)
        self.query_one("#connection", Static).update(self.connection)
        self.query_one("#version", Static).update(version)
        self.query_one("#round", Static).update(round_text)
        self.query_one("#activity", Static).update(self.activity)
        bar = self.query_one("#busy", ProgressBar)
        bar.display = self.activity.endswith("…")
        if self.progress is None:
            bar.update(total=None)
        else:
            bar.update(total=max(self.progress[1], 1), progress=self.progress[0])

    def _fill_table(self) -> None:
        table = self.query_one("#hospitals", DataTable)
        table.clear()
        for h in self.hospitals:
            table.add_row(h.name + ("" if h.registered else " (unregistered)"), yes(h.online),
                          yes(h.joined), yes(h.submitted), short_time(h.last_seen),
                          h.cert_expires[:10] or "unknown", key=h.name)
