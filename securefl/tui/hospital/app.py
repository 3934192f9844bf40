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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual import on, work
from textual.timer import Timer

from securefl.client.agent import control as agent_control
from securefl.client.hospital import Hospital
from securefl.client.session import HospitalSession, ServerStatus
from securefl.errors import AgentUnavailableError, SecureFLError, ServerWentBackError
from securefl.tui.common import HERE as COMMON
from securefl.tui.common import ConfirmScreen, SecureFLApp, clock, explain, outage_words
from securefl.tui.hospital.agent import AgentScreen
from securefl.tui.hospital.classify import ClassifyScreen
from securefl.tui.hospital.dashboard import DashboardScreen, describe_local
from securefl.tui.hospital.get import GetScreen
from securefl.tui.hospital.history import HistoryScreen
from securefl.tui.hospital.login import LoginScreen
from securefl.tui.hospital.send import NAMES, SendScreen
from securefl.tui.hospital.train import TrainScreen

STATUS_EVERY = 5.0
#: How often the app asks the hospital's agent (its local socket) what it is doing.
AGENT_EVERY = 2.0


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
        #: The running agent's last status (None: no agent answers on the local socket).
        self.agent_status: dict[str, Any] | None = None
        self._agent_timer: Timer | None = None
        self._agent_told: tuple[bool, int | None] = (False, None)

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
        self.refresh_agent()
        self._agent_timer = self.set_interval(AGENT_EVERY, self.refresh_agent)
        if self.autoconnect:
            self.connect()
            self._status_timer = self.set_interval(STATUS_EVERY, self.refresh_status)

    def busy_reason(self) -> str | None:
        for screen in self.screen_stack:
            if isinstance(screen, SendScreen) and screen.running:
                # The masked update leaves during the "masked-sent" row; before that row
                # nothing of it is used, and "the round may fail for every hospital" was
                # wrong (a walk: quitting while waiting for the others to join).
                return (IN_A_ROUND if screen.done >= NAMES.index("masked-sent")
                        else IN_A_ROUND_NOT_SENT)
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
        try:
            await self.hospital.check_server_not_behind(session)
        except ServerWentBackError as exc:
            # Get and Send refuse it too; said at once, since nothing else here would.
            self.notify(exc.message[0].upper() + exc.message[1:] + ".",
                        title="The server went back", severity="error", timeout=30)
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
        where = ""
        if self.hospital is not None:
            where = f"{self.hospital.settings.host}:{self.hospital.settings.port}"
        self._show_disconnected(f"{what} since {clock()}: {outage_words(exc, where)} — "
                                f"trying again in {delay:.0f} s (r: now)")
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
            h, c = self.hospital, self.config_path
            self._unless_agent("train", lambda: self.push_screen(TrainScreen(h, c)))

    def action_send(self) -> None:
        if self._can_act():
            assert self.hospital is not None
            h = self.hospital
            self._unless_agent("send",
                               lambda: self.push_screen(SendScreen(h, self.current_session)))

    def action_get(self) -> None:
        if self._can_act():
            assert self.hospital is not None
            h = self.hospital
            self._unless_agent("get the global model",
                               lambda: self.push_screen(GetScreen(h, self.current_session)))

    # -- the hospital's agent (securefl.client.agent; its screen: tui.hospital.agent) ---------
    def action_agent(self) -> None:
        if self._can_act():
            self.push_screen(AgentScreen(self.agent_status))

    def _unless_agent(self, what: str, then: Callable[[], object]) -> None:
        """Run ``then`` unless an agent owns the hospital's state; then say so and show it.

        Without a socket file there is no agent (no socket I/O needed); with one, the
        agent is asked off the event loop's time before anything starts."""
        assert self.hospital is not None
        if self.agent_status is None and \
                not agent_control.socket_path(self.hospital.state_dir).exists():
            then()
            return
        self._check_agent_then(what, then)

    @work(exclusive=True, group="agent-check")
    async def _check_agent_then(self, what: str, then: Callable[[], object]) -> None:
        await self._poll_agent()
        if self.agent_status is None:
            then()
            return
        self.notify(f"The hospital's agent is running and owns its model and rounds, so the "
                    f"app does not {what} itself: watch it, approve or skip rounds here, or "
                    "stop its service to work by hand.", title="Agent running",
                    severity="warning", timeout=8)
        self.push_screen(AgentScreen(self.agent_status))

    @work(exclusive=True, group="agent")
    async def refresh_agent(self) -> None:
        await self._poll_agent()

    async def _poll_agent(self) -> None:
        if self.hospital is None:
            return
        try:
            status: dict[str, Any] | None = await agent_control.call(
                self.hospital.state_dir, "status", timeout=3.0)
        except AgentUnavailableError:
            status = None
        self.agent_status = status
        for screen in self.screen_stack:
            if isinstance(screen, AgentScreen):
                screen.show(status)
        pending = (status or {}).get("pending")
        told = (status is not None, pending["schedule_round"] if pending else None)
        if told != self._agent_told:
            if status is not None and not self._agent_told[0]:
                self.notify("The hospital's agent is running: it takes part in the "
                            "server's rounds, and the app does not train or send itself "
                            "(a: see the agent).", title="Agent running")
            if told[1] is not None:
                self.notify(f"Round {told[1]} waits for your approval (a: see what it would "
                            "train on, then approve or skip).", title="Approval needed",
                            severity="warning", timeout=10)
            self._agent_told = told

    @on(AgentScreen.Decided)
    def _decided(self, message: AgentScreen.Decided) -> None:
        self._tell_agent(message.decision, message.schedule_round)

    @work(group="agent-decide")
    async def _tell_agent(self, decision: str, schedule_round: int) -> None:
        assert self.hospital is not None
        try:
            reply = await agent_control.call(self.hospital.state_dir, decision,
                                             schedule_round=schedule_round)
        except AgentUnavailableError as exc:
            self.notify(exc.message[0].upper() + exc.message[1:] + ".", severity="error")
            return
        if reply.get("ok"):
            self.notify(f"Round {schedule_round} approved: the agent trains and takes part."
                        if decision == "approve" else
                        f"Round {schedule_round} skipped: the agent sits it out.",
                        title="Agent")
        else:
            self.notify(str(reply.get("error", "the agent refused")), severity="error")
        await self._poll_agent()

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
        if self._agent_timer is not None:
            self._agent_timer.stop()
            self._agent_timer = None
        self.agent_status, self._agent_told = None, (False, None)
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


#: ``busy_reason`` while a send runs: quitting then is an interrupted send.
IN_A_ROUND = ("This hospital is in a secure-aggregation round: quitting now drops it from "
              "the round, and the round may fail for every hospital")
IN_A_ROUND_NOT_SENT = ("This hospital is in a secure-aggregation round and its update has not "
                       "been sent yet: quitting now takes it out of the round, and nothing of "
                       "its update is used (send it later)")


def run_hospital_app(config: Path | None, hospital_name: str | None) -> int:
    """``securefl client [--config FILE] [--hospital NAME]`` with no action.

    Quit during a send, the terminal gets what the CLI's interrupted ``send`` prints and
    its exit code 130: walking it, the app closed with 0 and no word, even when the
    update had gone out."""
    app = HospitalApp(config, hospital_name)
    return goodbye(app, app.run() or 0)


def goodbye(app: HospitalApp, code: int) -> int:
    """The words and exit code once the app has gone (see ``run_hospital_app``)."""
    if app.quit_while in (IN_A_ROUND, IN_A_ROUND_NOT_SENT) and app.config_path is not None:
        from securefl.client.commands import interrupted_send_note

        print(f"securefl: {interrupted_send_note(app.config_path)}", file=sys.stderr)
        return 130
    return code
