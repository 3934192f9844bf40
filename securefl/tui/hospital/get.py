"""Get weights: download the global model (sha256 checked), then evaluate it locally.

Steps: download -> sha256 verified (``HospitalSession.get_global`` refuses a mismatch) ->
loaded into the local model -> evaluated on this hospital's validation scans (the Testing
scans are kept for reported figures: ``securefl client ... evaluate --split testing``).
The download is one exclusive async worker; the evaluation is TensorFlow work in a thread
worker.
"""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, ProgressBar, Static

from securefl.client.hospital import Hospital
from securefl.client.session import HospitalSession
from securefl.ml.data import describe_skipped
from securefl.ml.train import EvalReport, append_history
from securefl.tui.common import ConfirmScreen, notify_error

HERE = Path(__file__).parent
STEPS = ["Downloading", "sha256 verified", "Loaded into the local model", "Evaluated"]


class GetScreen(Screen):
    CSS_PATH = HERE / "get.tcss"
    BINDINGS = [("escape", "back", "Back"), ("enter", "start", "Get weights")]

    class Evaluated(Message):
        def __init__(self, report: EvalReport | None, error: BaseException | None) -> None:
            super().__init__()
            self.report, self.error = report, error

    class Downloaded(Message):
        """Bubbles to the app: the local model is now global version ``version``."""

        def __init__(self, version: int) -> None:
            super().__init__()
            self.version = version

    def __init__(self, hospital: Hospital, session: HospitalSession | None) -> None:
        super().__init__()
        self.hospital, self.session = hospital, session
        self.running = False
        self.version: int | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="get"):
            with Horizontal(id="top"):
                yield Button("Get weights", variant="primary", id="start")
                yield ProgressBar(total=len(STEPS), show_eta=False, id="bar")
            yield ProgressBar(total=100, show_eta=False, id="download")
            yield Static("", id="state")
            yield Static("", id="summary")
            with Horizontal(id="tables"):
                yield DataTable(id="per-class", cursor_type="none")
                yield DataTable(id="confusion", cursor_type="none")
        yield Footer()

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        if self.running:
            return
        if self.session is None:
            self.notify("Not connected to the server: press Escape, then r to reconnect.",
                        severity="error")
            return
        self.running = True
        self.query_one("#start", Button).disabled = True
        self.check_then_download()

    @work(exclusive=True, group="get")
    async def check_then_download(self) -> None:
        """A trained, unsent model would be overwritten: ask first (training takes long)."""
        assert self.session is not None
        try:
            status = await self.session.status()
        except Exception as exc:  # shown as a notification
            self._fail(exc)
            return
        base = self.hospital.unsent_training(status.version)
        if base is None:
            self._begin(False)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._begin(True)
            else:
                self.running = False
                self.query_one("#start", Button).disabled = False
                self.query_one("#state", Static).update(
                    "Kept the trained model: press Escape, then s to send its update.")

        self.app.push_screen(ConfirmScreen(
            f"The local model was trained on version {base} and its update was not sent. "
            "Replace it with the global model (the training is lost)?", default_no=True),
            answered)

    def _begin(self, replace_trained: bool) -> None:
        self._step(0)
        self.download(replace_trained)

    def action_back(self) -> None:
        if self.running:
            self.notify("Please wait until the download and evaluation finish.",
                        severity="warning")
            return
        self.dismiss()

    def _step(self, done: int, extra: str = "") -> None:
        self.query_one("#bar", ProgressBar).update(progress=done)
        text = "  ".join(("✔ " if i < done else "· ") + s for i, s in enumerate(STEPS))
        self.query_one("#state", Static).update(text + (f"\n{extra}" if extra else ""))

    def _downloaded(self, received: int, total: int) -> None:
        """Bytes of the model so far; the bar moves only when a whole percent is added."""
        bar = self.query_one("#download", ProgressBar)
        if bar.total != total:
            bar.update(total=total)
        if received == total or received * 100 // total != (bar.progress or 0) * 100 // total:
            bar.update(progress=received)
            self.query_one("#state", Static).update(
                f"Downloading the global model: {received / 1e6:.1f} of {total / 1e6:.1f} MB")

    def _fail(self, exc: BaseException) -> None:
        self.running = False
        self.query_one("#start", Button).disabled = False
        notify_error(self.app, exc, "Get weights failed")

    @work(exclusive=True, group="download")
    async def download(self, replace_trained: bool = False) -> None:
        assert self.session is not None
        try:
            model = await self.hospital.get(self.session, on_progress=self._downloaded,
                                            replace_trained=replace_trained)
        except Exception as exc:  # shown as a notification
            self._fail(exc)
            return
        append_history(self.hospital.ml.history_path,
                       {"event": "get", "version": model.version, "sha256": model.sha256,
                        "contributors": model.contributors,
                        "total_samples": model.total_samples})
        self.version = model.version
        self._step(3, f"Global version {model.version}, sha256 {model.sha256[:16]}…; "
                   "evaluating on this hospital's validation scans…")
        self.post_message(self.Downloaded(model.version))
        self.evaluate()

    @work(thread=True, exclusive=True, group="evaluate")
    def evaluate(self) -> None:
        try:
            report = self.hospital.evaluate()
        except Exception as exc:  # shown as a notification
            self.post_message(self.Evaluated(None, exc))
            return
        self.post_message(self.Evaluated(report, None))

    @on(Evaluated)
    def _evaluated(self, message: Evaluated) -> None:
        if message.error is not None or message.report is None:
            self._fail(message.error or RuntimeError("no report"))
            return
        self.running = False
        self.query_one("#start", Button).disabled = False
        r = message.report
        self._step(4)
        skipped = describe_skipped(r.skipped, self.hospital.ml.scans_dir)
        self.query_one("#summary", Static).update(
            f"Global version {self.version} on {r.num_samples} validation scans (held out of "
            f"Training){_personalised(self.hospital)} · balanced accuracy "
            f"{r.balanced_accuracy:.1%} · accuracy {r.accuracy:.1%} · macro F1 {r.macro_f1:.3f}"
            + (f" · calibration error {r.ece_before:.3f} -> {r.ece_after:.3f}"
               if r.ece_before is not None and r.ece_after is not None else "")
            + (f"\n{skipped}" if skipped else ""))
        if skipped:
            self.notify(skipped, title="Some test files were not used", severity="warning",
                        timeout=30)
        show_report(self.query_one("#per-class", DataTable),
                    self.query_one("#confusion", DataTable), r)


def _personalised(hospital: Hospital) -> str:
    """", recalibrated on this hospital's scans": how ``get`` made the model its own."""
    from securefl.ml.local import PERSONALISATION_LABELS

    how = PERSONALISATION_LABELS.get(hospital.local_state().personalisation)
    return f", {how}" if how else ", as downloaded (not personalised)"


def show_report(per_class: DataTable, confusion: DataTable, r: EvalReport) -> None:
    """Per-class recall/precision and the confusion matrix (rows true, columns predicted)."""
    per_class.clear(columns=True)
    per_class.add_columns("Class", "Recall", "Precision", "n")
    for name, m in r.per_class.items():
        per_class.add_row(name, f"{m.recall:.0%}", f"{m.precision:.0%}", str(m.support))
    names = list(r.per_class)
    confusion.clear(columns=True)
    confusion.add_columns("true\\pred", *[n[:4] for n in names])
    for name, row in zip(names, r.confusion, strict=True):
        confusion.add_row(name, *[str(v) for v in row])
