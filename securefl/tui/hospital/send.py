"""Send weights: one secure-aggregation round, shown live as a stepper.

The round is ``Hospital.send`` (an awaitable that lasts until the administrator aggregates),
so it runs in an exclusive async worker; its ``on_step`` callback moves the stepper.  While
the hospital waits for the others, a timer asks the server for the round status on the
same session to show "k of n".  The steps are told in plain words; the protocol's own
wording for each step is kept for the details view (d).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Button, Footer, Header, Static

from securefl.client.hospital import Hospital
from securefl.client.session import HospitalSession, RoundOutcome, RoundStep
from securefl.errors import SecureFLError
from securefl.tui.common import TextScreen, clock, explain

HERE = Path(__file__).parent

#: (step name from ``securefl.client.session.STEPS`` that completes the row, row text)
ROWS = [
    ("joined", "Joined the round"),
    ("roster", "Waiting for the other hospitals"),
    ("keys-shared", "Keys shared with them"),
    ("masked-sent", "Masked update sent"),
    ("unmasked", "Waiting for the administrator to combine the updates"),
    ("published", "Combined into a new global version"),
]
NAMES = [name for name, _ in ROWS]
#: What the hospital is doing while row ``i`` is the current one.
DOING = [
    "Joining the round…",
    "Waiting for the other hospitals to join…",
    "Exchanging keys with the other hospitals…",
    "Sending the masked update…",
    "Update sent. Waiting for the administrator to combine the updates: keep this screen "
    "open until then.",
    "Combining the updates into a new global version…",
]


def render_rows(done: int, failed: bool, notes: dict[int, str], *,
                started: bool = True) -> list[str]:
    """Row ``i`` is done if ``i < done``, current if ``i == done``, else pending; nothing is
    current before the round started."""
    lines = []
    for i, (_, text) in enumerate(ROWS):
        if not started:
            mark = "·"
        else:
            mark = "✔" if i < done else ("✘" if failed and i == done else
                                          ("▶" if i == done else "·"))
        note = f" — {notes[i]}" if i in notes else ""
        lines.append(f" {mark} {text}{note}")
    return lines


def plain_note(step: RoundStep) -> str | None:
    """The part of a step's detail a clinician needs (a number), or None."""
    if step.name == "joined" and (m := re.search(r"round (\d+)", step.detail)):
        return f"round {m.group(1)}"
    if step.name == "roster" and (m := re.search(r"(\d+) hospitals", step.detail)):
        return f"{m.group(1)} hospitals in the round"
    if step.name == "published" and (m := re.search(r"version (\d+)", step.detail)):
        return f"version {m.group(1)}"
    return None


class SendScreen(Screen):
    CSS_PATH = HERE / "send.tcss"
    TITLE = "Send the update"
    HELP = ("Sends this hospital's trained update into one round of secure aggregation. "
            "The update is masked before it leaves: the server only ever sees the sum of "
            "all hospitals' updates.  The round lasts until the administrator combines the "
            "updates, so keep this screen open; leaving or quitting drops this hospital "
            "from the round.  d shows each step's technical detail.")
    BINDINGS = [("escape", "back", "Back"), ("enter", "start", "Send"),
                Binding("escape", "busy_back", show=False), ("d", "details", "Details")]

    class Sent(Message):
        """The round ended: ``outcome`` or ``error``.  Bubbles to the app."""

        def __init__(self, outcome: RoundOutcome | None, error: BaseException | None) -> None:
            super().__init__()
            self.outcome, self.error = outcome, error

    def __init__(self, hospital: Hospital,
                 session: Callable[[], HospitalSession | None] | HospitalSession | None
                 ) -> None:
        """``session``: the app's current session, asked each time it is needed (after a
        reconnection it is a new one)."""
        super().__init__()
        self.hospital = hospital
        self._session = session if callable(session) else (lambda: session)
        self.done = 0
        self.failed = False
        self.running = False
        self.started = False
        self.notes: dict[int, str] = {}
        self.steps_log: list[str] = []
        self._poll: Timer | None = None

    @property
    def session(self) -> HospitalSession | None:
        return self._session()

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="send"):
            yield Static("Send this hospital's trained update to the federation. Only the "
                         "masked update leaves the hospital; the server sees the sum only.",
                         id="intro", markup=False)
            yield Static("", id="steps", markup=False)
            yield Static("Press Enter (or Send) to start.", id="message", markup=False)
            yield Button("Send", variant="primary", id="start")
        yield Footer()

    def on_mount(self) -> None:
        self._draw_steps()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("start", "back"):
            return not self.running
        if action == "busy_back":
            return self.running
        return True

    def _draw_steps(self) -> None:
        # A round's last step or a reconnection can land after the app began closing and
        # this screen's widgets went (a CI run ended the app with NoMatches so): nothing is
        # left to draw then.
        with contextlib.suppress(NoMatches):
            self.query_one("#steps", Static).update("\n".join(
                render_rows(self.done, self.failed, self.notes, started=self.started)))

    def _say(self, text: str) -> None:
        with contextlib.suppress(NoMatches):  # the screen is closing (see _draw_steps)
            self.query_one("#message", Static).update(text)

    def connection_changed(self, connected: bool) -> None:
        """The app lost or regained the server; say what that means here."""
        if self.running:
            return  # the round itself reports what the lost connection did
        if connected:
            self._say("Connected to the server again. Press Enter (or Send) to send.")
        else:
            self._say("Not connected to the server: the app is reconnecting by itself. "
                      "Send works again once it is connected.")

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        if self.running:
            return
        if self.session is None:
            self._say("Not connected to the server: the app is reconnecting by itself. "
                      "Send works again once it is connected.")
            self.notify("Not connected to the server yet: the app is reconnecting.",
                        severity="error")
            return
        self.done, self.failed, self.notes, self.started = 0, False, {}, True
        self.running = True
        self.refresh_bindings()
        self.query_one("#start", Button).disabled = True
        self.steps_log.append(f"{clock()} send started")
        self._say(DOING[0])
        self._draw_steps()
        self._poll = self.set_interval(1.0, self.poll_status)
        self.run_round()

    def action_back(self) -> None:
        if not self.running:
            self.dismiss()

    def action_busy_back(self) -> None:
        self.notify("The round is in progress: leaving now would drop this hospital "
                    "from it. Wait for the administrator to combine the updates.",
                    severity="warning")

    def action_details(self) -> None:
        body = "\n".join(self.steps_log) or "Nothing sent yet on this screen."
        self.app.push_screen(TextScreen("Round details (technical)", body))

    def on_step(self, step: RoundStep) -> None:
        self.steps_log.append(f"{clock()} {step.name}: {step.detail}")
        if step.name in NAMES:
            i = NAMES.index(step.name)
            self.done = max(self.done, i + 1)
            if (note := plain_note(step)) is not None:
                self.notes[i] = note
        if self.running and self.done < len(DOING):
            self._say(DOING[self.done])
        self._draw_steps()

    def needed(self) -> int:
        """The fewest hospitals this hospital's own policy lets a round have."""
        p = self.hospital.settings.policy
        return max(p.min_contributors, p.colluders + 2)

    @work(exclusive=True, group="round")
    async def poll_status(self) -> None:
        """k of n for the waiting row (a failed poll is only skipped: the round decides)."""
        session = self.session
        if session is None or not self.running or self.done != 1:
            return
        try:
            st = await session.status()
        except SecureFLError:
            return
        self.notes[1] = (f"{len(st.joined)} of {len(st.online)} online hospitals joined; "
                         f"at least {self.needed()} are needed")
        self._draw_steps()

    @work(exclusive=True, group="send")
    async def run_round(self) -> None:
        session = self.session
        assert session is not None
        try:
            outcome = await self.hospital.send(session, on_step=self.on_step)
        except Exception as exc:  # every failure is shown; the app keeps running
            self._end(None, exc)
            return
        self._end(outcome, None)

    def _end(self, outcome: RoundOutcome | None, error: BaseException | None) -> None:
        self.running = False
        self.refresh_bindings()
        if self._poll is not None:
            self._poll.stop()
        with contextlib.suppress(NoMatches):  # the screen is closing (see _draw_steps)
            self.query_one("#start", Button).disabled = False
        if error is not None:
            self.failed = True
            self.steps_log.append(f"{clock()} failed: {error}")
            self._say(explain(error))
        else:
            assert outcome is not None
            self.done = len(ROWS)
            self.notes[len(ROWS) - 1] = f"version {outcome.version}"
            self._say(
                f"Round {outcome.round_id} is complete, but the server has not stored "
                f"version {outcome.version} yet; nothing to send again. Next: get it (g) "
                "once it is out." if outcome.pending else
                f"Round {outcome.round_id} published global version "
                f"{outcome.version}. Next: press Escape, then g to get it.")
        self._draw_steps()
        self.post_message(self.Sent(outcome, error))
