"""``AdminApp``: the federation administrator's live view and controls.

Why polling: the server pushes nothing to the admin, so a timer asks for the status and the
hospitals table every ``REFRESH_EVERY`` seconds in an exclusive worker (a slow answer is
replaced, never queued).  Aggregation can take the whole unmask step, so it runs in its own
worker and the dashboard shows what it is waiting for meanwhile.

Before asking "are you sure?", each control asks the server whether it can work now (a
fresh status): the administrator is never offered to combine zero updates, or to abort a
round that is not running.  When the server cannot be reached the app retries with backoff
and greys what it last knew.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from textual import work

from securefl import config
from securefl.client.admin_text import doomed_reason
from securefl.client.session import AdminSession, ScheduleView, ServerStatus, UnmaskProgress
from securefl.errors import NotEnoughSurvivorsError, SecureFLError
from securefl.tui.admin.audit import AuditScreen
from securefl.tui.admin.dashboard import COLLECTING, AdminDashboard, short_time
from securefl.tui.admin.versions import VersionsScreen
from securefl.tui.common import HERE as COMMON
from securefl.tui.common import ConfirmScreen, SecureFLApp, clock, explain, sentence

REFRESH_EVERY = 2.0
AUDIT_LINES = 200


def too_few_advice(exc: SecureFLError) -> str:
    """One account of a failed unmask step: what happened, what it means, what to do
    (once: walking it, the server's sentence and this one both said "nothing was
    published" and gave two different next steps)."""
    if "nothing was published" in exc.message:
        return f"Aggregation failed: {sentence(exc.message)}"
    return (f"Aggregation failed: {sentence(exc.message)} Nothing was published and the "
            "hospitals are told to send again. Next: ask them to stay connected until you "
            "aggregate, then aggregate again.")


def how_a_round_opens(sched: ScheduleView | None) -> str:
    """What opens the next round, for a refusal with no round (the README's promise: each
    error says what to do next; walking it, "nothing to combine" ended there)."""
    if sched is None or sched.mode != "auto":
        return ("a round opens when a hospital sends its update (Send in its app, or "
                "`securefl client send`)")
    if sched.round is not None:
        return (f"scheduled round {sched.round.schedule_round}'s hospitals are still "
                "training; the server closes and combines it itself")
    if sched.paused:
        return "the schedule is paused: u resumes it, o opens a round now"
    when = f" at {short_time(sched.next_open)} UTC" if sched.next_open else ""
    return f"the schedule opens the next round{when}; o opens one now"


def cannot(action: str, st: ServerStatus, sched: ScheduleView | None = None) -> str | None:
    """Why ``action`` cannot work in the round ``st`` describes (with the schedule
    ``sched``), or None if it can."""
    if action == "aggregate":
        if st.phase == "idle":
            return ("No round is running, so there is nothing to combine: "
                    f"{how_a_round_opens(sched)}.")
        if st.phase == "enrolling":
            return (f"Enrolment is still open ({len(st.joined)} hospital(s) joined): close it "
                    "(e) once everyone taking part has joined, then aggregate when their "
                    "updates are in.")
        if st.phase != COLLECTING:
            return (f"The round is still {st.phase}: aggregate once the hospitals' updates "
                    "are being received.")
        if st.collected == 0:
            return (f"No updates received yet (0 of {len(st.joined)} joined hospitals): wait "
                    "until they are in.")
    if action == "abort" and st.phase == "idle":
        return "No round is running, so there is nothing to abort."
    if action == "close" and st.phase != "enrolling":
        return (f"No round is enrolling, so there is no enrolment to close: "
                f"{how_a_round_opens(sched)}." if st.phase == "idle" else
                f"Enrolment of round {st.round_id} is already closed ({st.phase}): aggregate "
                "(a) once the updates are in.")
    if action == "close" and st.waiting_for:
        return (f"Round {st.round_id} may only combine the hospitals of a failed round's "
                f"survivor list, and {', '.join(st.waiting_for)} have not joined: ask them to "
                "connect and send; enrolment then closes by itself.")
    if action == "close" and len(st.joined) < st.min_joined:
        return too_few_to_close(st)
    return None


def too_few_to_close(st: ServerStatus) -> str:
    """One sentence: how many joined, how many the server needs, what to do.  Walking it,
    Close offered "with 1 hospital(s)?" and only after Yes said "a round needs at least 3"."""
    lower = ""
    if st.min_joined > 2 and st.min_joined_by:
        also = (" and each hospital's [policy] colluders"
                if st.min_joined_by == "[round] colluders" else "")
        lower = (f", or lower {st.min_joined_by} in server.toml{also} and restart the "
                 "server")
    return (f"Only {len(st.joined)} hospital(s) joined round {st.round_id} and closing "
            f"enrolment needs at least {st.min_joined}: wait for more to join (enrolment "
            f"also closes by itself){lower}.")


def can_close(st: ServerStatus | None) -> bool:
    """Whether the server would close enrolment now (the footer offers Close only then)."""
    return st is not None and cannot("close", st) is None


class AdminApp(SecureFLApp):
    TITLE = "securefl administrator"
    CSS_PATH = COMMON / "common.tcss"

    def __init__(self, settings: config.ClientSettings | None, *, connect: bool = True) -> None:
        super().__init__()
        self.settings = settings
        self.autoconnect = connect
        self.session: AdminSession | None = None
        self.dashboard = AdminDashboard()
        self.busy = False

    def on_mount(self) -> None:
        self.push_screen(self.dashboard)
        if self.autoconnect and self.settings is not None:
            self.connect()
            self.set_interval(REFRESH_EVERY, self.poll)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Close is in the footer only while it can work (a round enrols with enough
        hospitals joined, as last polled); its hidden twin binding ``close_enrolment('why')``
        still answers e with the reason at other times."""
        if action == "close_enrolment" and not parameters:
            return can_close(self.dashboard.status) and not self.dashboard.stale
        return super().check_action(action, parameters)

    def busy_reason(self) -> str | None:
        if self.busy:
            return ("The updates are being combined: quitting now leaves the round "
                    "unfinished and the hospitals must send again")
        return None

    # -- network ---------------------------------------------------------------------------
    @work(exclusive=True, group="connect")
    async def connect(self) -> None:
        assert self.settings is not None
        self.cancel_reconnect()
        await self._close()
        s = self.settings
        self.dashboard.show(connection=f"Connecting to {s.host}:{s.port}…")
        try:
            # The session reads the certificate, key and CA files: off the loop (a slow or
            # network disk must not freeze the screen while retrying with backoff).
            session = await asyncio.to_thread(AdminSession, s)
            await session.connect()
        except SecureFLError as exc:
            self._lost(exc, "Not connected")
            return
        self.session = session
        self.connected_again()
        self.dashboard.show(connection=f"Connected to {s.host}:{s.port} as {session.name}")
        await self._refresh_once()

    def _lost(self, exc: SecureFLError, what: str) -> None:
        first = self._retry_at == 0
        delay = self.schedule_reconnect(self.connect)
        self.dashboard.show(connection=f"{what} since {clock()} — trying again in "
                            f"{delay:.0f} s (r: now)", stale=True)
        if first:
            self.notify(explain(exc), title=what, severity="error", timeout=8)

    async def _refresh_once(self) -> None:
        if self.session is None:
            return
        try:
            status = await self.session.status()
            hospitals = await self.session.hospitals()
            schedule = await self.session.schedule()
        except SecureFLError as exc:
            await self._close()
            self._lost(exc, "Connection lost")
            return
        self.dashboard.show(status=status, hospitals=tuple(hospitals), stale=False,
                            schedule=schedule)
        if (note := await self._doomed(status)) is not None \
                and note not in self.dashboard.activity:
            # Walking it: the table still read "collecting, 3 of 3" for a round that had
            # lost a hospital and could no longer finish.
            self.dashboard.show(activity=note)
            self.notify(note, title="The round cannot finish", severity="warning", timeout=10)

    async def _doomed(self, st: ServerStatus) -> str | None:
        """The server's word that the collecting round can no longer finish (its
        ``round-doomed`` audit entry), as a sentence; None otherwise."""
        if self.session is None or st.phase != COLLECTING or not st.round_id:
            return None
        try:
            entries = await self.session.audit(limit=200)
        except SecureFLError:
            return None
        why = doomed_reason(st.round_id, entries)
        return None if why is None else (
            f"Round {st.round_id} cannot finish: {why}. Aggregate (a) or abort (x) ends it "
            "with nothing published; its hospitals then send again.")

    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        await self._refresh_once()

    async def _close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            with contextlib.suppress(SecureFLError, OSError):
                await session.close()

    # -- actions -----------------------------------------------------------------------------
    def _connected(self) -> bool:
        if self.session is None:
            self.notify("Not connected to the server: the app is reconnecting (r: now).",
                        severity="error")
            return False
        return True

    def action_refresh(self) -> None:
        if self.session is None and self.settings is not None:
            self.connected_again()
            self.connect()
        elif self.session is not None:
            self.poll()

    def _confirm(self, question: str, then: Callable[[], object], title: str) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                then()

        self.push_screen(ConfirmScreen(question, title=title), answered)

    @work(exclusive=True, group="ask")
    async def _ask(self, action: str) -> None:
        """Ask the server whether ``action`` can work now; if so, ask the administrator."""
        if not self._connected() or self.busy:
            return
        assert self.session is not None
        try:
            st = await self.session.status()
        except SecureFLError as exc:
            await self._close()
            self._lost(exc, "Connection lost")
            return
        self.dashboard.show(status=st)
        sched = self.dashboard.schedule
        if action == "abort" and sched is not None and sched.round is not None:
            r = sched.round
            self._confirm(f"Abort scheduled round {r.schedule_round}? Nothing is published; "
                          "hospitals that sent must send again, and the schedule opens the "
                          "next round as planned.", self.abort, "Abort the round")
            return
        if (why := cannot(action, st, sched)) is not None:
            self.dashboard.show(activity=why)
            self.notify(why, title="Not now", severity="warning", timeout=6)
            return
        if action == "aggregate" and (note := await self._doomed(st)) is not None:
            self._confirm(f"{note} End it now?", self.aggregate, "Aggregate")
        elif action == "aggregate":
            self._confirm(f"Combine the {st.collected} update(s) received in round "
                          f"{st.round_id} and publish global version {st.version + 1}?",
                          self.aggregate, "Aggregate")
        elif action == "close":
            self._confirm(f"Close enrolment of round {st.round_id} now, with "
                          f"{len(st.joined)} hospital(s)? Hospitals that have not joined "
                          "wait for the next round.", self.close_enrolment, "Close enrolment")
        elif action == "abort":
            self._confirm(f"Abort round {st.round_id}? Nothing is published; every hospital "
                          "in it has to send again.", self.abort, "Abort the round")

    def action_aggregate(self) -> None:
        self._ask("aggregate")

    def action_close_enrolment(self, why: str = "") -> None:
        self._ask("close")

    def action_abort(self) -> None:
        self._ask("abort")

    @work(exclusive=True, group="admin")
    async def aggregate(self) -> None:
        assert self.session is not None
        self.busy = True
        self.dashboard.show(activity="Combining: asking the hospitals for their key shares, "
                            "then removing the masks…")

        def progress(p: UnmaskProgress) -> None:
            self.dashboard.show(
                activity=f"Combining round {p.round_id}: {p.answered} of {p.asked} "
                f"hospitals answered ({p.needed} needed)…", progress=(p.answered, p.asked))

        try:
            out = await self.session.aggregate(on_progress=progress)
        except NotEnoughSurvivorsError as exc:
            self.dashboard.show(activity=too_few_advice(exc), sticky=True)
            self.notify("Too few hospitals stayed online; see the status line.",
                        title="Aggregation failed", severity="error", timeout=6)
        except SecureFLError as exc:
            self.dashboard.show(activity=f"Aggregation failed: {explain(exc)}", sticky=True)
            self.notify("See the status line.", title="Aggregation failed",
                        severity="error", timeout=6)
        else:
            self.dashboard.show(activity=f"Published version {out.version}: "
                                f"{out.contributors} hospitals, {out.total_samples} scans. "
                                "Next: the hospitals get it (g) and train on it.", sticky=True)
            self.notify(f"Version {out.version} published.", title="Aggregated")
        finally:
            self.busy = False
        await self._refresh_once()

    @work(exclusive=True, group="admin")
    async def close_enrolment(self) -> None:
        assert self.session is not None
        try:
            round_id = await self.session.close_enrolment()
        except SecureFLError as exc:
            self.dashboard.show(activity=f"Close enrolment failed: {explain(exc)}")
        else:
            self.dashboard.show(activity=f"Enrolment of round {round_id} closed. Next: "
                                "aggregate (a) once the updates are in.", sticky=True)
        await self._refresh_once()

    @work(exclusive=True, group="admin")
    async def abort(self) -> None:
        assert self.session is not None
        try:
            round_id = await self.session.abort_round()
        except SecureFLError as exc:
            self.dashboard.show(activity=f"Abort failed: {explain(exc)}")
        else:
            self.dashboard.show(activity=f"Round {round_id} aborted; hospitals will send "
                                "again.", sticky=True)
        await self._refresh_once()

    # -- the schedule ([schedule] mode = "auto") -------------------------------------------
    def action_pause(self) -> None:
        self._schedule_action("pause")

    def action_resume(self) -> None:
        self._schedule_action("resume")

    def action_open_round(self) -> None:
        sched = self.dashboard.schedule
        if sched is not None and sched.round is not None:
            why = (f"Scheduled round {sched.round.schedule_round} is still open: abort it (x) "
                   "first to open another now.")
            self.dashboard.show(activity=why)
            self.notify(why, title="Not now", severity="warning", timeout=6)
            return
        self._confirm("Open a scheduled round now? The hospitals' agents download the "
                      "current version, train and join it.",
                      lambda: self._schedule_action("open"), "Open a round")

    @work(exclusive=True, group="admin")
    async def _schedule_action(self, action: str) -> None:
        if not self._connected():
            return
        assert self.session is not None
        call = {"pause": self.session.pause, "resume": self.session.resume,
                "open": self.session.open_round}[action]
        try:
            value = await call()
        except SecureFLError as exc:
            self.dashboard.show(activity=f"{action.capitalize()} failed: {explain(exc)}")
            self.notify(explain(exc), title=f"{action.capitalize()} refused",
                        severity="warning", timeout=6)
        else:
            done = {"pause": "Schedule paused: no further round opens until you resume (u).",
                    "resume": "Schedule running again.",
                    "open": f"Scheduled round {value} opened; the hospitals train and join."}
            self.dashboard.show(activity=done[action], sticky=True)
        await self._refresh_once()

    @work(exclusive=True, group="views")
    async def action_versions(self) -> None:
        if not self._connected():
            return
        assert self.session is not None
        try:
            versions = await self.session.history(limit=200)
        except SecureFLError as exc:
            self.notify(explain(exc), title="Version history", severity="error")
            return
        await self.push_screen(VersionsScreen(versions))

    @work(exclusive=True, group="views")
    async def action_audit(self) -> None:
        if not self._connected():
            return
        assert self.session is not None
        try:
            entries = await self.session.audit(limit=AUDIT_LINES)
        except SecureFLError as exc:
            self.notify(explain(exc), title="Audit log", severity="error")
            return
        await self.push_screen(AuditScreen(entries))

    def action_logout(self) -> None:
        self._confirm("Log out and disconnect from the server? (The server and any round "
                      "go on without you.)", self.logout, "Log out")

    @work(exclusive=True, group="connect")
    async def logout(self) -> None:
        await self._close()
        self.exit(0)


def run_admin_app(config_path: Path) -> int:
    """``securefl admin --config admin.toml`` with no action."""
    settings = config.load(config_path, config.ClientSettings)
    return AdminApp(settings).run() or 0
