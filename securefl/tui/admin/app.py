"""``AdminApp``: the federation administrator's live view and controls.

Why polling: the server pushes nothing to the admin, so a timer asks for the status and the
hospitals table every ``REFRESH_EVERY`` seconds in an exclusive worker (a slow answer is
replaced, never queued).  Aggregation can take the whole unmask step, so it runs in its own
worker and the dashboard shows what it is waiting for meanwhile.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from textual import work
from textual.app import App

from securefl import config
from securefl.client.session import AdminSession, UnmaskProgress
from securefl.errors import NotEnoughSurvivorsError, SecureFLError
from securefl.tui.admin.audit import AuditScreen
from securefl.tui.admin.dashboard import AdminDashboard
from securefl.tui.admin.versions import VersionsScreen
from securefl.tui.common import ConfirmScreen, notify_error

REFRESH_EVERY = 2.0
AUDIT_LINES = 200


def too_few_advice(exc: SecureFLError) -> str:
    return (f"{exc.message}. Not enough hospitals stayed online to remove the masks, so the "
            "round was abandoned and no version was published. The hospitals are told to "
            "send again: ask them to stay connected until aggregation, then aggregate again.")


class AdminApp(App[int]):
    TITLE = "securefl — administrator"
    ENABLE_COMMAND_PALETTE = False  # every action is on a key shown in the footer

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

    # -- network ---------------------------------------------------------------------------
    @work(exclusive=True, group="connect")
    async def connect(self) -> None:
        assert self.settings is not None
        await self._close()
        s = self.settings
        self.dashboard.show(connection=f"Connecting to {s.host}:{s.port}…")
        session = AdminSession(s)
        try:
            await session.connect()
        except SecureFLError as exc:
            self.dashboard.show(connection="Not connected (press r to retry)")
            notify_error(self, exc, "Cannot connect")
            return
        self.session = session
        self.dashboard.show(connection=f"Connected to {s.host}:{s.port} as {session.name}")
        await self._refresh_once()

    async def _refresh_once(self) -> None:
        if self.session is None:
            return
        try:
            status = await self.session.status()
            hospitals = await self.session.hospitals()
        except SecureFLError as exc:
            await self._close()
            self.dashboard.show(connection="Connection lost (press r to reconnect)")
            notify_error(self, exc, "Connection lost")
            return
        self.dashboard.show(status=status, hospitals=tuple(hospitals))

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
            self.notify("Not connected to the server: press r to reconnect.", severity="error")
            return False
        return True

    def action_refresh(self) -> None:
        if self.session is None and self.settings is not None:
            self.connect()
        elif self.session is not None:
            self.poll()

    def _confirm(self, question: str, then: object) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                then()  # type: ignore[operator]

        self.push_screen(ConfirmScreen(question), answered)

    def action_aggregate(self) -> None:
        if self._connected() and not self.busy:
            st = self.dashboard.status
            k = st.collected if st else 0
            self._confirm(f"Aggregate the {k} weight set(s) collected and publish the next "
                          "version?", self.aggregate)

    def action_close_enrolment(self) -> None:
        if self._connected() and not self.busy:
            self._confirm("Close enrolment now? Hospitals that have not joined wait for the "
                          "next round.", self.close_enrolment)

    def action_abort(self) -> None:
        if self._connected() and not self.busy:
            self._confirm("Abort the current round? Nothing is published; hospitals will "
                          "send again.", self.abort)

    @work(exclusive=True, group="admin")
    async def aggregate(self) -> None:
        assert self.session is not None
        self.busy = True
        self.dashboard.show(activity="Unmasking: asking the hospitals for their key shares, "
                            "then removing the masks…")

        def progress(p: UnmaskProgress) -> None:
            self.dashboard.show(
                activity=f"Unmasking round {p.round_id}: {p.answered} of {p.asked} "
                f"hospitals answered ({p.needed} needed)…", progress=(p.answered, p.asked))

        try:
            out = await self.session.aggregate(on_progress=progress)
        except NotEnoughSurvivorsError as exc:
            self.dashboard.show(activity="Aggregation failed: too few hospitals online.")
            self.notify(too_few_advice(exc), title="Aggregation failed", severity="error",
                        timeout=15)
        except SecureFLError as exc:
            self.dashboard.show(activity="Aggregation failed.")
            notify_error(self, exc, "Aggregation failed")
        else:
            self.dashboard.show(activity=f"Published version {out.version}: "
                                f"{out.contributors} hospitals, {out.total_samples} samples.")
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
            notify_error(self, exc, "Close enrolment failed")
        else:
            self.dashboard.show(activity=f"Enrolment of round {round_id} closed.")
        await self._refresh_once()

    @work(exclusive=True, group="admin")
    async def abort(self) -> None:
        assert self.session is not None
        try:
            round_id = await self.session.abort_round()
        except SecureFLError as exc:
            notify_error(self, exc, "Abort failed")
        else:
            self.dashboard.show(activity=f"Round {round_id} aborted; hospitals will send again.")
        await self._refresh_once()

    @work(exclusive=True, group="views")
    async def action_versions(self) -> None:
        if not self._connected():
            return
        assert self.session is not None
        try:
            versions = await self.session.history(limit=200)
        except SecureFLError as exc:
            notify_error(self, exc, "Version history")
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
            notify_error(self, exc, "Audit log")
            return
        await self.push_screen(AuditScreen(entries))

    def action_logout(self) -> None:
        self._confirm("Log out and disconnect from the server?", self.logout)

    @work(exclusive=True, group="connect")
    async def logout(self) -> None:
        await self._close()
        self.exit(0)


def run_admin_app(config_path: Path) -> int:
    """``securefl admin --config admin.toml`` with no action."""
    settings = config.load(config_path, config.ClientSettings)
    return AdminApp(settings).run() or 0
