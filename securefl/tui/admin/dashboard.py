"""The administrator's live dashboard: version, round phase, k of n, hospitals table.

Attributes down: the app sets ``status``, ``hospitals``, ``activity`` and ``stale``; the
screen renders.  A line about an action ("Aggregation failed…") is cleared once the round
it was about has moved on, so the screen never shows advice for a state that is gone.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from securefl.client.admin_text import hospital_part
from securefl.client.session import HospitalInfo, ScheduleView, ServerStatus
from securefl.tui.common import Progress, TextScreen, clock, pairs

HERE = Path(__file__).parent

#: The server's phase name while masked updates come in (when aggregation can work).
COLLECTING = "collecting masked updates"
COLUMNS = [("Hospital", 14), ("Online", 6), ("Joined", 6), ("Sent", 4),
           ("Last seen (UTC)", 17), ("Cert expires", 12)]


def short_time(iso: str) -> str:
    """'2026-11-28T21:03:07+00:00' -> '2026-11-28 21:03'; '' -> 'not since restart'."""
    return iso.replace("T", " ")[:16] if iso else "not since restart"


def describe(status: ServerStatus | None,
             schedule: ScheduleView | None = None) -> tuple[str, str]:
    """The version line and the masked round's line.  While a scheduled round is open but
    its masked round has not started (hospitals still training), the round line says so:
    "none in progress" above "Scheduled round 3 ... enrolling" read as a contradiction."""
    if status is None:
        return "Global version: unknown", "Round: unknown (not connected)"
    scheduled = schedule.round if schedule is not None and schedule.mode == "auto" else None
    if status.phase == "idle" and scheduled is not None and scheduled.phase == "enrolling":
        round_text = (f"Round: the masked round starts once scheduled round "
                      f"{scheduled.schedule_round}'s hospitals have joined (below)")
    elif status.phase == "idle":
        round_text = "Round: none in progress"
    else:
        round_text = (f"Round {status.round_id}: {status.phase} · {len(status.joined)} joined "
                      f"· updates received: {status.collected} of {len(status.joined)}")
    if status.waiting_for:
        # A round on this version failed after its survivor list went out: only the
        # hospitals on it can go on, so say which are missing.
        round_text += f" · waiting for {', '.join(status.waiting_for)}"
    return (f"Global version: {status.version} · {len(status.online)} hospital(s) online",
            round_text)


def describe_schedule(view: ScheduleView | None) -> str:
    """The schedule in two or three lines ("" in manual mode: nothing changes there)."""
    if view is None or view.mode != "auto":
        return ""
    every = ("after each round" if view.every == "after-publish" else f"every {view.every}")
    state = "paused" if view.paused else "running"
    nxt = (f" · next {short_time(view.next_open)}" if view.next_open else "")
    lines = [f"Schedule: {state}, {every}, {view.training_deadline} to join{nxt}"]
    r = view.round
    if r is None:
        lines.append("Scheduled round: none open" + (" (paused: u resumes, o opens "
                                                      "one now)" if view.paused else ""))
    else:
        lines.append(f"Scheduled round {r.schedule_round} on version {r.base_version}: "
                     f"{r.phase}, deadline {short_time(r.deadline)[11:]} · "
                     + ", ".join(f"{n} {hospital_part(st)}"
                                 for n, st in sorted(r.hospitals.items())))
    if view.stalled is not None:
        lines.append(f"Stalled on version {view.stalled.base_version}: {view.stalled.reason}")
    return "\n".join(lines)


def yes(flag: bool) -> str:
    return "yes" if flag else "-"


def merge_known(old: tuple[HospitalInfo, ...],
                new: tuple[HospitalInfo, ...]) -> tuple[HospitalInfo, ...]:
    """After a server restart it knows no "last seen" or certificate expiry for hospitals
    that have not connected since: keep what this app saw before instead of "never"."""
    before = {h.name: h for h in old}
    out = []
    for h in new:
        prev = before.get(h.name)
        if prev is not None:
            h = replace(h, last_seen=h.last_seen or prev.last_seen,
                        cert_expires=h.cert_expires or prev.cert_expires)
        out.append(h)
    return tuple(out)


class AdminDashboard(Screen):
    CSS_PATH = HERE / "dashboard.tcss"
    TITLE = "Federation"
    HELP = ("The federation at a glance, refreshed every 2 s: the global version, the "
            "round in progress and each hospital (online, joined this round, update sent, "
            "last seen, certificate expiry; Enter on a row shows it in full).\n"
            "A round: hospitals press Send; enrolment closes by itself once every hospital "
            "joined (or close it with e, offered once as many have joined as the server "
            "needs); once their updates are in, a combines them and publishes the next "
            "version.  x aborts a round (the hospitals send again).  "
            "Greyed values marked 'stale' are the last known while the server cannot be "
            "reached; the app reconnects by itself.\n"
            "With [schedule] mode = \"auto\" the server opens and publishes rounds itself: "
            "the schedule lines show the open round's phase, each hospital's part in it "
            "and a version the cross-round rule holds up.  p pauses the schedule, u resumes "
            "it, o opens a round now, x aborts the open round.\n"
            "v lists the published versions, l shows the audit log, r refreshes now.")
    BINDINGS = [("a", "app.aggregate", "Aggregate"),
                # e: in the footer only while closing can work (AdminApp.check_action); the
                # hidden twin answers e at other times with why not and what to do.
                ("e", "app.close_enrolment", "Close"),
                Binding("e", "app.close_enrolment('why')", "", show=False),
                ("x", "app.abort", "Abort"), ("v", "app.versions", "Versions"),
                ("l", "app.audit", "Audit"),
                # r, p, u, o: in the help (F1) and the command palette, not the footer, so
                # the footer fits at 80 columns (the app refreshes and reconnects by itself;
                # the schedule keys act only with [schedule] mode = "auto")
                Binding("r", "app.refresh", "Refresh", show=False),
                Binding("p", "app.pause", "Pause schedule", show=False),
                Binding("u", "app.resume", "Resume schedule", show=False),
                Binding("o", "app.open_round", "Open a round now", show=False),
                ("q", "app.logout", "Log out")]

    def __init__(self) -> None:
        super().__init__()
        self.connection = "Not connected"
        self.status: ServerStatus | None = None
        self.hospitals: tuple[HospitalInfo, ...] = ()
        self.activity = ""
        #: (done, total) for the activity's bar; None: an indeterminate bar.
        self.progress: tuple[int, int] | None = None
        self.stale = False
        self.as_of = ""
        #: The server's schedule (None until known; manual mode shows nothing of it).
        self.schedule: ScheduleView | None = None
        #: The (round, phase, version) the activity line was written about.
        self._activity_state: tuple[int, str, int] | None = None

    _UNSET = object()

    @staticmethod
    def _key(status: ServerStatus | None) -> tuple[int, str, int] | None:
        return None if status is None else (status.round_id, status.phase, status.version)

    def show(self, *, connection: str | None = None, status: object = _UNSET,
             hospitals: tuple[HospitalInfo, ...] | None = None,
             activity: str | None = None, progress: tuple[int, int] | None = None,
             stale: bool | None = None, sticky: bool = False,
             schedule: ScheduleView | None = None) -> None:
        """Set what the app learnt; redraw if mounted (else ``on_mount`` draws it).

        A new ``activity`` without ``progress`` makes the bar indeterminate again.  An
        activity line is dropped once the round moves on from the state it was written in
        (``sticky``: from the state after it, e.g. a failed round's advice)."""
        if connection is not None:
            self.connection = connection
        if status is not self._UNSET and status is not None:
            new = self._key(status)  # type: ignore[arg-type]
            if (self.activity and not self.activity.endswith("…")
                    and self._activity_state is not None and new != self._activity_state):
                self.activity = ""
            self.status = status  # type: ignore[assignment]
            self.as_of = clock()
            if self._activity_state is None:
                self._activity_state = new
        if stale is not None:
            self.stale = stale
        if schedule is not None:
            self.schedule = schedule
        if hospitals is not None:
            self.hospitals = merge_known(self.hospitals, hospitals)
            if self.is_mounted:
                with contextlib.suppress(NoMatches):  # the app is closing: its widgets go
                    self._fill_table()
        if activity is not None:
            self.activity = activity
            self.progress = progress
            # Sticky advice outlives the refresh right after it (the round's end itself).
            self._activity_state = None if sticky else self._key(self.status)
        if self.is_mounted and (status is not self._UNSET or stale is not None):
            self.refresh_bindings()  # Close shows only while it can work
        if self.is_mounted:
            # A refresh that lands while the app exits finds its widgets removed (the
            # status poll ended the app with NoMatches so): nothing is left to draw.
            with contextlib.suppress(NoMatches):
                self._draw()

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="main"):
            yield Static(self.connection, id="connection", markup=False)
            with Vertical(id="known"):
                yield Static("", id="version", markup=False)
                yield Static("", id="round", markup=False)
                yield Static("", id="schedule", markup=False)
                yield DataTable(id="hospitals", cursor_type="row", zebra_stripes=True)
            yield Static("", id="activity", markup=False)
            yield Progress(total=None, show_eta=False, show_percentage=False, id="busy")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        table = self.query_one("#hospitals", DataTable)
        for label, width in COLUMNS:  # fixed widths: the rows change every refresh
            table.add_column(label, width=width)
        self._fill_table()
        self._draw()

    def _draw(self) -> None:
        version, round_text = describe(self.status, self.schedule)
        if self.stale and self.status is not None:
            version += f" (stale: as of {self.as_of})"
            round_text += " (stale)"
        self.query_one("#connection", Static).update(self.connection)
        self.query_one("#connection").set_class(self.stale, "offline")
        self.query_one("#known").set_class(self.stale, "stale")
        self.query_one("#version", Static).update(version)
        self.query_one("#round", Static).update(round_text)
        sched = describe_schedule(self.schedule)
        self.query_one("#schedule", Static).update(sched)
        self.query_one("#schedule").display = bool(sched)
        self.query_one("#activity", Static).update(self.activity)
        bar = self.query_one("#busy", Progress)
        bar.display = self.activity.endswith("…")
        if self.progress is None:
            bar.update(total=None)
        else:
            bar.update(total=max(self.progress[1], 1), progress=self.progress[0])

    def _fill_table(self) -> None:
        table = self.query_one("#hospitals", DataTable)
        row = table.cursor_row
        table.clear()
        for h in self.hospitals:
            table.add_row(h.name + ("" if h.registered else " (unregistered)"), yes(h.online),
                          yes(h.joined), yes(h.submitted), short_time(h.last_seen),
                          h.cert_expires[:10] or "unknown", key=h.name)
        if self.hospitals:
            table.move_cursor(row=min(row, len(self.hospitals) - 1))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """A hospital in full: nothing is cut off by the columns."""
        if not 0 <= event.cursor_row < len(self.hospitals):
            return
        h = self.hospitals[event.cursor_row]
        body = "\n".join(pairs([
            ("Hospital", h.name), ("On the member list", yes(h.registered)),
            ("Online", yes(h.online)), ("Joined this round", yes(h.joined)),
            ("Update sent this round", yes(h.submitted)),
            ("Last seen (UTC)", h.last_seen or "not since the server restarted"),
            ("Certificate expires", h.cert_expires or "unknown (not connected since the "
             "server restarted)")]))
        self.app.push_screen(TextScreen(f"Hospital {h.name}", body))
