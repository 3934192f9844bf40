"""Agent: what the hospital's agent is doing, its recent rounds, Approve / Skip.

Why a screen of its own: while an agent runs (``securefl client ... agent``, usually a
service) it owns the hospital's model and rounds, and the app does not train or send; what
people do here is watch it and decide on the round waiting for approval, seeing what it
would train on.  Attributes down: the app polls the agent's local socket (async, never on
the event loop's time) and calls ``show``; the buttons ask the app to send the decision.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, ProgressBar, Static

from securefl.ml.settings import clinical_name

HERE = Path(__file__).parent

STATE_WORDS = {
    "connecting": "Connecting to the server",
    "waiting": "Waiting for the server to open a round",
    "pending-approval": "A round waits for your approval",
    "training": "Training on this hospital's scans",
    "in-round": "In a secure-aggregation round",
    "done": "Round finished",
    "failed": "The last round failed",
    "paused": "The server's schedule is paused",
}


def state_line(status: dict[str, Any] | None) -> str:
    if status is None:
        return "No agent is running for this hospital."
    words = STATE_WORDS.get(status.get("state", ""), str(status.get("state", "?")))
    how = ("joins rounds by itself" if status.get("participation") == "auto"
           else "asks before each round")
    window = f", only {status['window']}" if status.get("window") else ""
    return f"Agent: {words} (it {how}{window})"


def pending_line(pending: dict[str, Any]) -> str:
    deadline = str(pending.get("deadline") or "")
    when = f"; decide before {deadline.replace('T', ' ')[:16]} UTC" if deadline else ""
    return (f"Round {pending['schedule_round']} would train on global version "
            f"{pending['base_version']} with these scans{when}.")


def recent_rows(recent: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(round, version, outcome, balanced accuracy) per recent round, newest first."""
    rows = []
    for r in reversed(recent):
        outcome = str(r.get("outcome", "?"))
        if outcome == "published" and r.get("version") is not None:
            outcome = f"published v{r['version']}"
        if r.get("reason") and r["reason"] != r.get("outcome"):
            outcome += f" ({r['reason']})"
        acc = r.get("balanced_accuracy")
        rows.append((str(r.get("schedule_round", "?")), str(r.get("base_version", "?")),
                     outcome, f"{acc:.1%}" if isinstance(acc, int | float) else "-"))
    return rows


class AgentScreen(Screen):
    CSS_PATH = HERE / "agent.tcss"
    TITLE = "Agent"
    HELP = ("The hospital's agent runs as a service and takes part in the rounds the server "
            "opens: it gets the global model, trains on your scans, sends the masked update "
            "and evaluates the new version.  While it runs, this app does not train or send "
            "itself.  When a round waits for approval, the table shows how many scans of "
            "each class it would train and validate on: a approves, k skips (the server "
            "hears only 'declined').  Below: the agent's recent rounds.")
    BINDINGS = [("escape", "back", "Back"), ("a", "approve", "Approve"),
                ("k", "skip", "Skip"), Binding("r", "refresh", "Refresh", show=False)]

    class Decided(Message):
        """A person approved or skipped a round (the app tells the agent)."""

        def __init__(self, decision: str, schedule_round: int) -> None:
            super().__init__()
            self.decision, self.schedule_round = decision, schedule_round

    def __init__(self, status: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.status = status

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="agent"):
            # The agent's own sentences quote settings and reason codes in brackets
            # ("([agent] max_rounds_per_day) [daily-limit]"): shown as written, not read
            # as markup (which swallowed them).
            yield Static("", id="state", markup=False)
            yield Static("", id="detail", markup=False)
            yield ProgressBar(total=1.0, show_eta=False, id="progress")
            with Vertical(id="pending"):
                yield Static("", id="pending-text", markup=False)
                yield DataTable(id="scans", cursor_type="none", zebra_stripes=True)
                with Horizontal(id="decide"):
                    yield Button("Approve (a)", id="approve", variant="success")
                    yield Button("Skip (k)", id="skip", variant="warning")
            yield Static("Recent rounds", id="recent-label", markup=False)
            yield DataTable(id="recent", cursor_type="none", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#scans", DataTable).add_columns("Class", "Train", "Validation")
        self.query_one("#recent", DataTable).add_columns("Round", "On version", "Outcome",
                                                         "Balanced acc.")
        self._draw()

    def show(self, status: dict[str, Any] | None) -> None:
        self.status = status
        if self.is_mounted:
            # The app's agent poll can answer after the app began closing and this screen's
            # widgets went: nothing is left to draw then (NoMatches ended the app so).
            with contextlib.suppress(NoMatches):
                self._draw()

    def _draw(self) -> None:
        status = self.status
        self.query_one("#state", Static).update(state_line(status))
        pending = status.get("pending") if status else None
        detail = self.query_one("#detail", Static)
        detail.update(str(status.get("detail", "")) if status else
                      "Start it with `securefl client --config hospital.toml agent` or its "
                      "service (docs/QUICKSTART.md).")
        detail.display = not pending  # the pending panel says it all
        bar = self.query_one("#progress", ProgressBar)
        progress = status.get("progress") if status else None
        bar.display = status is not None and status.get("state") == "training" \
            and isinstance(progress, int | float)
        if bar.display:
            bar.update(progress=float(progress))  # type: ignore[arg-type]
        self.query_one("#pending").display = bool(pending)
        if pending:
            self.query_one("#pending-text", Static).update(pending_line(pending))
            table = self.query_one("#scans", DataTable)
            table.clear()
            scans = pending.get("scans") or {}
            train, val = scans.get("train") or {}, scans.get("validation") or {}
            for cls in train:
                table.add_row(clinical_name(cls), str(train[cls]), str(val.get(cls, 0)))
            table.add_row("total", str(sum(train.values())), str(sum(val.values())))
        recent = self.query_one("#recent", DataTable)
        recent.clear()
        rows = recent_rows((status or {}).get("recent") or [])
        for row in rows:
            recent.add_row(*row)
        self.query_one("#recent-label", Static).update(
            "Recent rounds" if rows else "Recent rounds: none yet")

    def _decide(self, decision: str) -> None:
        pending = (self.status or {}).get("pending")
        if not pending:
            self.notify("No round is waiting for approval.", severity="warning")
            return
        self.post_message(self.Decided(decision, int(pending["schedule_round"])))

    def action_approve(self) -> None:
        self._decide("approve")

    def action_skip(self) -> None:
        self._decide("skip")

    def action_back(self) -> None:
        self.dismiss()

    def action_refresh(self) -> None:
        refresh = getattr(self.app, "refresh_agent", None)
        if refresh is not None:
            refresh()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id in ("approve", "skip"):
            self._decide(event.button.id)
