"""Send weights: one secure-aggregation round, shown live as a stepper.

The round is ``Hospital.send`` (an awaitable that lasts until the administrator aggregates),
so it runs in an exclusive async worker; its ``on_step`` callback moves the stepper.  While
the hospital waits for the others, a timer asks the server for the round status on the
same session to show "k of n".
"""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Static

from securefl.client.hospital import Hospital
from securefl.client.session import HospitalSession, RoundOutcome, RoundStep
from securefl.errors import SecureFLError
from securefl.tui.common import explain

HERE = Path(__file__).parent

#: (step name from ``securefl.client.session.STEPS`` that completes the row, row text)
ROWS = [
    ("joined", "Joined the round"),
    ("roster", "Waiting for the other hospitals"),
    ("keys-shared", "Keys shared"),
    ("masked-sent", "Masked update sent"),
    ("unmasked", "Waiting for aggregation"),
    ("published", "Aggregated into a new global version"),
]
NAMES = [name for name, _ in ROWS]


def render_rows(done: int, failed: bool, notes: dict[int, str]) -> list[str]:
    """Row ``i`` is done if ``i < done``, current if ``i == done``, else pending."""
    lines = []
    for i, (_, text) in enumerate(ROWS):
        mark = "✔" if i < done else ("✘" if failed and i == done else
                                      ("▶" if i == done else "·"))
        note = f" — {notes[i]}" if i in notes else ""
        lines.append(f" {mark} {text}{note}")
    return lines


class SendScreen(Screen):
    CSS_PATH = HERE / "send.tcss"
    BINDINGS = [("escape", "back", "Back"), ("enter", "start", "Send")]

    class Sent(Message):
        """The round ended: ``outcome`` or ``error``.  Bubbles to the app."""

        def __init__(self, outcome: RoundOutcome | None, error: BaseException | None) -> None:
            super().__init__()
            self.outcome, self.error = outcome, error

    def __init__(self, hospital: Hospital, session: HospitalSession | None) -> None:
        super().__init__()
        self.hospital, self.session = hospital, session
        self.done = 0
        self.failed = False
        self.running = False
        self.notes: dict[int, str] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="send"):
            yield Static("Send this hospital's trained update to the federation. Only the "
                         "masked update leaves the hospital; the server sees the sum only.",
                         id="intro")
            yield Static("", id="steps")
            yield Static("", id="message")
            yield Button("Send", variant="primary", id="start")
        yield Footer()

    def on_mount(self) -> None:
        self._draw_steps()

    def _draw_steps(self) -> None:
        self.query_one("#steps", Static).update("\n".join(render_rows(self.done, self.failed,
                                                                      self.notes)))

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        if self.running:
            return
        if self.session is None:
            self.notify("Not connected to the server: press Escape, then r to reconnect.",
                        severity="error")
            return
        self.done, self.failed, self.notes = 0, False, {}
        self.running = True
        self.query_one("#start", Button).disabled = True
        self.query_one("#message", Static).update("Joining the round…")
        self._draw_steps()
        self._poll = self.set_interval(1.0, self.poll_status)
        self.run_round()

    def action_back(self) -> None:
        if self.running:
            self.notify("The round is in progress: leaving now would drop this hospital "
                        "from it. Wait for the administrator to aggregate.", severity="warning")
            return
        self.dismiss()

    def on_step(self, step: RoundStep) -> None:
        if step.name in NAMES:
            self.done = max(self.done, NAMES.index(step.name) + 1)
            self.notes[NAMES.index(step.name)] = step.detail
        self._draw_steps()

    @work(exclusive=True, group="round")
    async def poll_status(self) -> None:
        """k of n for the waiting row (a failed poll is only skipped: the round decides)."""
        if self.session is None or not self.running or self.done != 1:
            return
        try:
            st = await self.session.status()
        except SecureFLError:
            return
        self.notes[1] = f"{len(st.joined)} of {len(st.online)} online hospitals joined"
        self._draw_steps()

    @work(exclusive=True, group="send")
    async def run_round(self) -> None:
        assert self.session is not None
        try:
            outcome = await self.hospital.send(self.session, on_step=self.on_step)
        except Exception as exc:  # every failure is shown; the app keeps running
            self._end(None, exc)
            return
        self._end(outcome, None)

    def _end(self, outcome: RoundOutcome | None, error: BaseException | None) -> None:
        self.running = False
        self._poll.stop()
        self.query_one("#start", Button).disabled = False
        message = self.query_one("#message", Static)
        if error is not None:
            self.failed = True
            message.update(explain(error))
        else:
            assert outcome is not None
            self.done = len(ROWS)
            self.notes[len(ROWS) - 1] = f"version {outcome.version}"
            message.update(
                f"Round {outcome.round_id} is complete, but the server has not stored "
                f"version {outcome.version} yet; nothing to send again: get it once it is "
                "out." if outcome.pending else
                f"Round {outcome.round_id} published global version "
                f"{outcome.version}. Press Escape, then g to get it.")
        self._draw_steps()
        self.post_message(self.Sent(outcome, error))
