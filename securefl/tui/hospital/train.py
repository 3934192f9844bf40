"""Train the local model: epochs and batch size, progress per epoch and batch, live curves.

Training is TensorFlow work that blocks for minutes, so a thread worker that only posts
messages supervises it; the training itself runs in a child process (see ``trainer``: in
this process TensorFlow's long GIL holds froze the event loop for up to a second).
``Update`` coalesces: when batches come faster than the screen repaints, only the newest
is kept.  Cancel sets a ``threading.Event`` that reaches the training callback, which checks
it after every batch.
"""

from __future__ import annotations

import threading
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Sparkline, Static

from securefl.client.hospital import Hospital
from securefl.errors import SecureFLError
from securefl.ml.data import describe_skipped
from securefl.ml.train import Progress, TrainResult
from securefl.tui.common import Progress as ProgressBar
from securefl.tui.common import explain, notify_error
from securefl.tui.hospital.trainer import train_in_child

HERE = Path(__file__).parent
CURVE_POINTS = 200


class TrainScreen(Screen):
    CSS_PATH = HERE / "train.tcss"
    TITLE = "Train the local model"
    HELP = ("Trains this hospital's model on its own scans (they never leave this "
            "machine), starting from the global version it last got.  Set the most epochs "
            "(passes over the scans) and the batch size, then Enter or Start; it stops early "
            "once the loss on the held-out validation scans stops improving, keeping the "
            "best epoch.  The bars show the epoch and the batch; the curves, the loss (lower "
            "is better) and the accuracy on the training scans.  Cancel (ctrl+x) stops after "
            "the current batch and leaves the model as it was.  Next: Escape, then s to send.")
    BINDINGS = [("escape", "back", "Back"), ("enter", "start", "Start"),
                Binding("escape", "busy_back", show=False),
                # priority: the focused number field would otherwise take ctrl+x as "cut"
                Binding("ctrl+x", "cancel", "Cancel training", priority=True)]

    class Update(Message):
        """One training step; a newer one replaces an older one still in the queue."""

        def __init__(self, progress: Progress) -> None:
            super().__init__()
            self.progress = progress

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, TrainScreen.Update)

    class Finished(Message):
        """Training ended (``result``) or failed (``error``); bubbles up to the app."""

        def __init__(self, result: TrainResult | None, error: BaseException | None) -> None:
            super().__init__()
            self.result, self.error = result, error

    def __init__(self, hospital: Hospital, config: Path) -> None:
        super().__init__()
        self.hospital, self.config = hospital, config
        self.cancel_event = threading.Event()
        self.running = False
        self.losses: list[float] = []
        self.accuracies: list[float] = []

    def compose(self) -> ComposeResult:
        ml = self.hospital.ml
        yield Header()
        with VerticalScroll(id="train"):
            with Horizontal(id="settings"):
                yield Label("Max epochs", markup=False)
                yield Input(str(ml.epochs), id="epochs", type="integer")
                yield Label("Batch size", markup=False)
                yield Input(str(ml.batch_size), id="batch", type="integer")
            with Horizontal(id="buttons"):
                yield Button("Start", variant="primary", id="start")
                yield Button("Cancel (ctrl+x)", variant="error", id="cancel", disabled=True)
            yield Static("Press Start (or Enter) to train on this hospital's scans.",
                         id="state", markup=False)
            yield Label("Epoch", id="epoch-label", markup=False)
            # Determinate from the start: an idle indeterminate bar animates for nothing.
            yield ProgressBar(total=ml.epochs, id="epoch-bar", show_eta=False)
            yield Label("Batch", id="batch-label", markup=False)
            yield ProgressBar(total=1, id="batch-bar", show_eta=False)
            yield Static("Loss: -", id="loss-label", markup=False)
            yield Sparkline([], id="loss")
            yield Static("Accuracy on the training scans: -", id="acc-label", markup=False)
            yield Sparkline([], id="accuracy")
            yield Static("", id="skipped", markup=False)  # files the last run did not use
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The footer offers only what works now: Start and Back while idle, Cancel while
        training (Escape then explains why it cannot leave)."""
        if action in ("start", "back"):
            return not self.running
        if action in ("cancel", "busy_back"):
            return self.running
        return True

    def _set_running(self, running: bool) -> None:
        self.running = running
        self.query_one("#start", Button).disabled = running
        self.query_one("#cancel", Button).disabled = not running
        self.refresh_bindings()

    def _settings(self) -> tuple[int, int]:
        try:
            epochs = int(self.query_one("#epochs", Input).value)
            batch = int(self.query_one("#batch", Input).value)
        except ValueError:
            raise ValueError("epochs and batch size must be whole numbers") from None
        if not (1 <= epochs <= 1000 and 1 <= batch <= 4096):
            raise ValueError("epochs must be 1-1000 and batch size 1-4096")
        return epochs, batch

    @on(Button.Pressed, "#start")
    @on(Input.Submitted)
    def action_start(self) -> None:
        if self.running:
            return
        try:
            epochs, batch = self._settings()
        except ValueError as exc:
            self.notify(str(exc), title="Training settings", severity="error")
            return
        self.hospital.ml = self.hospital.ml.model_copy(
            update={"epochs": epochs, "batch_size": batch})
        self._set_running(True)
        self.cancel_event.clear()
        self.losses.clear()
        self.accuracies.clear()
        self.query_one("#cancel", Button).focus()
        self.query_one("#epoch-bar", ProgressBar).update(total=epochs, progress=0)
        self.query_one("#batch-bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#state", Static).update("Loading scans and the model…")
        self.query_one("#skipped", Static).display = False
        self.run_training()

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        if self.running:
            self.cancel_event.set()
            self.query_one("#state", Static).update("Cancelling after this batch…")

    def on_unmount(self) -> None:
        self.cancel_event.set()  # the app is closing: stop the thread after this batch

    def action_back(self) -> None:
        if not self.running:
            self.dismiss()

    def action_busy_back(self) -> None:
        self.notify("Training is running: cancel it first (ctrl+x).", severity="warning")

    @work(thread=True, exclusive=True, group="train")
    def run_training(self) -> None:
        """Blocking TensorFlow training; talks to the UI only through messages."""
        ml = self.hospital.ml
        try:
            result = train_in_child(self.config,
                                    {"epochs": ml.epochs, "batch_size": ml.batch_size},
                                    lambda p: self.post_message(self.Update(p)),
                                    self.cancel_event)
        except (SecureFLError, Exception) as exc:  # shown, never raised into the UI
            self.post_message(self.Finished(None, exc))
            return
        self.post_message(self.Finished(result, None))

    @on(Update)
    def _update(self, message: Update) -> None:
        p = message.progress
        if p.stage == "calibrating":  # the epochs are done; one pass per batch-norm layer
            self.query_one("#batch-bar", ProgressBar).update(total=p.batches, progress=p.batch)
            self.query_one("#batch-label", Label).update(
                f"Batch-norm layer {p.batch} of {p.batches}")
            self.query_one("#state", Static).update(
                "Measuring the batch-norm statistics over the training scans…")
            return
        self.query_one("#epoch-bar", ProgressBar).update(
            total=p.epochs, progress=p.epoch - 1 + p.batch / p.batches)
        self.query_one("#batch-bar", ProgressBar).update(total=p.batches, progress=p.batch)
        self.query_one("#epoch-label", Label).update(f"Epoch {p.epoch} of {p.epochs}")
        self.query_one("#batch-label", Label).update(f"Batch {p.batch} of {p.batches}")
        self.losses = ([*self.losses, p.loss])[-CURVE_POINTS:]
        self.accuracies = ([*self.accuracies, p.accuracy])[-CURVE_POINTS:]
        self.query_one("#loss", Sparkline).data = list(self.losses)
        self.query_one("#accuracy", Sparkline).data = list(self.accuracies)
        self.query_one("#loss-label", Static).update(f"Loss: {p.loss:.4f}")
        self.query_one("#acc-label", Static).update(
            f"Accuracy on the training scans: {p.accuracy:.1%}")
        self.query_one("#state", Static).update("Training… (ctrl+x or Cancel to stop)")

    @on(Finished)
    def _finished(self, message: Finished) -> None:
        self._set_running(False)
        state = self.query_one("#state", Static)
        if message.error is not None:
            # The reason stays on the screen (a notification fades), and the batch bar
            # stops: it kept animating after a refusal, as if work went on.
            state.update(f"Training failed: {explain(message.error)}")
            notify_error(self.app, message.error, "Training failed")
            self.query_one("#batch-bar", ProgressBar).update(total=1, progress=0)
        elif message.result is not None and message.result.cancelled:
            state.update("Training cancelled; the model was not changed.")
        elif message.result is not None:
            r = message.result
            skipped = describe_skipped(r.skipped, self.hospital.ml.scans_dir)
            kept = (f", kept epoch {r.best_epoch} of {r.epochs_run} (lowest loss on "
                    f"{r.validation_samples} validation scans)" if r.best_epoch else "")
            state.update(f"Trained on {r.num_samples} scans in {r.seconds:.0f} s{kept}. "
                         "Next: press Escape, then s to send the update.")
            self.query_one("#skipped", Static).update(skipped or "")
            self.query_one("#skipped", Static).display = bool(skipped)
            if skipped:
                self.notify(skipped, title="Some files were not used", severity="warning",
                            timeout=10)
                # below the charts: at 80x24 it was off the bottom of the screen
                self.set_timer(0.1, lambda: self.query_one("#train").scroll_end(
                    animate=False))  # the list is the last thing on the screen
            # Progress from the training process may be coalesced when the screen is busy:
            # the finished state must not show an earlier epoch.  Early stopping may have
            # ended before the most epochs allowed: the bar ends full either way.
            epochs = r.epochs_run or self.hospital.ml.epochs
            self.query_one("#epoch-bar", ProgressBar).update(total=epochs, progress=epochs)
            self.query_one("#epoch-label", Label).update(
                f"Epoch {epochs} of {epochs}" if epochs == self.hospital.ml.epochs else
                f"Epoch {epochs} of at most {self.hospital.ml.epochs}: stopped early (validation "
                "loss no longer improving)")
