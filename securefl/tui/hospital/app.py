"""``HospitalApp``: owns the hospital and its session; screens render and report.

Why the app owns the session: every action screen uses the same mutual-TLS connection, and
logging out must close exactly that one.  Screens ask the app for the session when they
need it (``self.session`` at that moment), so after an automatic reconnection they use the
new one.  The app reacts to the screens' messages (trained, sent, downloaded) by refreshing
the dashboard's attributes.

Reconnecting: when the server cannot be reached or the connection drops, the app tries
again after 1, 2, 4, 8, 15, then every 30 s, and the dashboard greys what it last knew and
marks it stale.  A send after a reconnection follows ``Hospital.send``'s own rules (the
send record in ``state/send.json``): the app never resends on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from textual import on, work
from textual.timer import Timer

from securefl.client.hospital import Hospital
from securefl.client.session import HospitalSession, ServerStatus
from securefl.errors import SecureFLError
from securefl.tui.common import HERE as COMMON
from securefl.tui.common import ConfirmScreen, SecureFLApp, clock, explain
from securefl.tui.hospital.classify import ClassifyScreen
from securefl.tui.hospital.dashboard import DashboardScreen, describe_local
from securefl.tui.hospital.get import GetScreen
from securefl.tui.hospital.history import HistoryScreen
from securefl.tui.hospital.login import LoginScreen
from securefl.tui.hospital.send import SendScreen
from securefl.tui.hospital.train import TrainScreen

STATUS_EVERY = 5.0


class HospitalApp(SecureFLApp):
    TITLE = "securefl hospital"
    CSS_PATH = COMMON / "common.tcss"

    def __init__(self, config: Path | None = None, hospital_name: str | None = None, *,
                 connect: bool = True) -> None:
        super().__init__()
        self.config_path, self.hospital_name = config, hospital_name
        self.autoconnect = connect
        self.hospital: Hospital | None = None
        self.session: HospitalSession | None = None
        self.dashboard: DashboardScreen | None = None
        self._status_timer: Timer | None = None

    def on_mount(self) -> None:
        self.push_screen(LoginScreen(self.config_path, self.hospital_name))

    @on(LoginScreen.LoggedIn)
    def _logged_in(self, message: LoginScreen.LoggedIn) -> None:
        self.hospital = h = message.hospital
        self.config_path = message.config
        self.sub_title = h.name
        self.dashboard = DashboardScreen(h.name, h.data_summary(), h.ml.scans_dir
                                         if h.has_ml else None)
        self.switch_screen(self.dashboard)
        self.refresh_local()
        if self.autoconnect:
            self.connect()
            self._status_timer = self.set_interval(STATUS_EVERY, self.refresh_status)

    def busy_reason(self) -> str | None:
        for screen in self.screen_stack:
            if isinstance(screen, SendScreen) and screen.running:
                return ("This hospital is in a secure-aggregation round: quitting now drops "
                        "it from the round, and the round may fail for every hospital")
            if isinstance(screen, TrainScreen) and screen.running:
                return "Training is running: quitting stops it and the model stays as it was"
            if isinstance(screen, GetScreen) and screen.running:
                return "The global model is being downloaded and evaluated"
        return None

    # -- attributes down -----------------------------------------------------------------------
    def refresh_local(self) -> None:
        if self.hospital is not None and self.dashboard is not None:
            self._read_local(self.hospital)

    @work(exclusive=True, group="local")
    async def _read_local(self, hospital: Hospital) -> None:
        """Read the hospital's state files off the event loop (a slow or network disk must
        not freeze the screen), then show them."""
        def read() -> tuple[str, dict[str, dict[str, int]]]:
            meta = hospital.global_meta()
            try:
                record = hospital.send_record()
            except SecureFLError:
                record = None  # a damaged record is reported when sending
            return (describe_local(hospital.local_state(), meta["version"] if meta else None,
                                   record), hospital.data_summary())

        local, summary = await asyncio.to_thread(read)
        if self.dashboard is not None:
            self.dashboard.show(local=local, summary=summary)

    def show_status(self, status: ServerStatus | None, connection: str, *,
                    stale: bool = False) -> None:
        if self.dashboard is not None:
            self.dashboard.show(status=status, connection=connection, stale=stale)

    def _show_disconnected(self, text: str) -> None:
        """Keep what was last known, greyed and marked stale."""
        if self.dashboard is not None:
            self.dashboard.show(connection=text, stale=True)
        for screen in self.screen_stack:
            if isinstance(screen, SendScreen | GetScreen):
                screen.connection_changed(False)

    # -- network -------------------------------------------------------------------------------
    @work(exclusive=True, group="connect")
    async def connect(self) -> None:
        assert self.hospital is not None
        self.cancel_reconnect()
        await self._close_session()
        s = self.hospital.settings
        if self.dashboard is not None:
            self.dashboard.show(connection=f"Connecting to {s.host}:{s.port}…")
        try:
            # The session reads the certificate, key and CA files: off the loop (a slow or
            # network disk must not freeze the screen while retrying with backoff).
            session = await asyncio.to_thread(self.hospital.session)
            await session.connect()
        except SecureFLError as exc:
            self._lost(exc, "Not connected")
            return
        self.session = session
        self.connected_again()
        for warning in session.conn.warnings:  # e.g. an expired revocation list
            self.notify(warning[0].upper() + warning[1:] + ".", severity="warning")
        if session.resend_round is not None:
            self.hospital.note_abandoned(session.resend_round)
            self.notify(f"Round {session.resend_round} ended without publishing anything "
                        "(it failed, was aborted, or the server restarted): send your update "
                        "again (s).", severity="warning")
        out = session.published_round
        if out is not None and self.hospital.note_published(*out):
            self.notify(f"Version {out[1]} is out: round {out[0]} published it with this "
                        "hospital's update in it while it was not connected (g to get it).")
        await self._status_once()
        for screen in self.screen_stack:
            if isinstance(screen, SendScreen | GetScreen):
                screen.connection_changed(True)

    def _lost(self, exc: SecureFLError, what: str) -> None:
        """Not connected: say so once per outage, keep the old data greyed, retry later."""
        first = self._retry_at == 0
        delay = self.schedule_reconnect(self.connect)
        self._show_disconnected(f"{what} since {clock()} — trying again in {delay:.0f} s "
                                "(r: now)")
        if first:
            self.notify(explain(exc), title=what, severity="error", timeout=8)

    async def _status_once(self) -> None:
        if self.session is None:
            return
        s = self.session.settings
        try:
            status = await self.session.status()
        except SecureFLError as exc:
            await self._close_session()
            self._lost(exc, "Connection lost")
            return
        self.show_status(status, f"Connected to {s.host}:{s.port} (mutual TLS)")

    @work(exclusive=True, group="status")
    async def refresh_status(self) -> None:
        await self._status_once()

    async def _close_session(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            with contextlib.suppress(SecureFLError, OSError):
                await session.close()

    def current_session(self) -> HospitalSession | None:
        """The session a screen should use now (a reconnection replaces it)."""
        return self.session

    # -- actions (keys, footer, dashboard buttons and the command palette) ---------------------
    def _can_act(self) -> bool:
        return self.hospital is not None and isinstance(self.screen, DashboardScreen)

    def action_reconnect(self) -> None:
        if self._can_act():
            if self.session is None:
                self.connected_again()  # a person asked: start the backoff from the top
                self.connect()
            else:
                self.refresh_status()
            self.refresh_local()

    def action_train(self) -> None:
        if self._can_act():
            assert self.hospital is not None
            assert self.config_path is not None
            self.push_screen(TrainScreen(self.hospital, self.config_path))

    def action_send(self) -> None:
        if self._can_act():
            assert self.hospital is not None
            self.push_screen(SendScreen(self.hospital, self.current_session))

    def action_get(self) -> None:
        if self._can_act():
            assert self.hospital is not None
            self.push_screen(GetScreen(self.hospital, self.current_session))

    def action_classify(self) -> None:
        if self._can_act():
            assert self.hospital is not None
            self.push_screen(ClassifyScreen(self.hospital))

    def action_history(self) -> None:
        if self._can_act():
            assert self.hospital is not None
            self.push_screen(HistoryScreen(self.hospital))

    def action_logout(self) -> None:
        if not self._can_act():
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.logout()

        self.push_screen(ConfirmScreen("Log out and disconnect from the server? You can "
                                       "sign in again at once.", title="Log out"), answered)

    @work(exclusive=True, group="connect")
    async def logout(self) -> None:
        """Close the session and go back to the sign-in screen (not out of the app)."""
        if self._status_timer is not None:
            self._status_timer.stop()
            self._status_timer = None
        self.cancel_reconnect()
        await self._close_session()
        config = self.config_path
        self.hospital = self.dashboard = None
        self.sub_title = ""
        await self.switch_screen(LoginScreen(config, None, auto=False))
        self.notify("Logged out: sign in again, or press ctrl+q to quit.", title="Logged out")

    # -- messages up ---------------------------------------------------------------------------
    @on(TrainScreen.Finished)
    @on(GetScreen.Downloaded)
    def _local_changed(self) -> None:
        self.refresh_local()
        if self.session is not None:
            self.refresh_status()

    @on(SendScreen.Sent)
    def _sent(self, message: SendScreen.Sent) -> None:
        if message.outcome is not None and not isinstance(self.screen, SendScreen):
            # (On the send screen its own message line says so; a toast would cover it.)
            self.notify(f"Global version {message.outcome.version} published. Next: get it "
                        "(g) to see how the shared model does on your scans.",
                        title="Round finished")
        self.refresh_local()
        if self.session is not None:
            self.refresh_status()


def run_hospital_app(config: Path | None, hospital_name: str | None) -> int:
    """``securefl client [--config FILE] [--hospital NAME]`` with no action."""
    return HospitalApp(config, hospital_name).run() or 0
