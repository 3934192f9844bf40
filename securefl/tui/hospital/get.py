"""Get weights: download the global model (checked against its fingerprint), then evaluate
it on this hospital's validation scans.

Steps: download -> checked intact (``HospitalSession.get_global`` refuses a mismatch) ->
loaded into the local model -> evaluated on this hospital's validation scans (held out of
training; the Testing scans are kept for reported figures: ``securefl client ... evaluate
--split testing``).  The download is one exclusive async worker; the evaluation is
TensorFlow work in a thread worker.  Results are told in clinical terms (balanced accuracy,
sensitivity, specificity, full class names); the rest (macro F1, precision, calibration
error, the fingerprint) is in the details view (d).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, Label, Static

from securefl.client.hospital import Hospital
from securefl.client.session import HospitalSession
from securefl.ml.calibration import ECE_BINS
from securefl.ml.data import describe_skipped
from securefl.ml.settings import clinical_name
from securefl.ml.train import EvalReport
from securefl.ml.train import Progress as TrainProgress
from securefl.tui.common import ConfirmScreen, TextScreen, explain, notify_error, pairs
from securefl.tui.common import Progress as ProgressBar

HERE = Path(__file__).parent
STEPS = ["Download", "Checked intact", "Loaded into the local model",
         "Evaluated on your validation scans"]


def specificity(confusion: list[list[int]], i: int) -> float | None:
    """Of the scans that are not class ``i``, the share the model did not call ``i``."""
    total = sum(map(sum, confusion))
    negatives = total - sum(confusion[i])
    false_pos = sum(row[i] for row in confusion) - confusion[i][i]
    return None if negatives == 0 else (negatives - false_pos) / negatives


def scans_word(r: EvalReport) -> str:
    """Which scans the report scored, in the words the screen uses for them."""
    return {"validation": "validation scan", "testing": "Testing scan"}.get(r.split,
                                                                           "test scan")


def one_class_warning(r: EvalReport) -> str:
    """A warning when the model gives every scored scan the same answer, else ''."""
    names = list(r.per_class)
    called = [sum(row[j] for row in r.confusion) for j in range(len(names))]
    if sum(called) and sum(1 for c in called if c) == 1 and len(names) > 1:
        only = clinical_name(names[called.index(max(called))])
        return (f"Warning: this model calls every {scans_word(r)} \"{only}\": it cannot "
                "tell the classes apart yet, so do not use it to classify scans. Train it (t) and "
                "send the update (s); later versions should do better.")
    return ""


def calibration(r: EvalReport) -> str:
    """How far the probabilities Classify shows can be taken at face value."""
    if r.ece_before is None:
        return "-"
    if r.ece_after is None or r.temperature is None:
        return f"{r.ece_before:.3f} (no temperature fitted for this model yet)"
    return f"{r.ece_before:.3f} raw -> {r.ece_after:.3f} with temperature {r.temperature:.2f}"


def report_details(r: EvalReport, version: int | None, sha256: str) -> str:
    """Everything the evaluation measured, for the details view."""
    names = list(r.per_class)
    lines = list(pairs([("Global version", str(version)),
                        ("Fingerprint (sha256)", sha256 or "-"),
                        ("Scored on", f"{r.num_samples} {scans_word(r)}s"
                         + (" (held out of training)" if r.split == "validation" else "")),
                        ("Balanced accuracy", f"{r.balanced_accuracy:.1%}"),
                        ("Accuracy", f"{r.accuracy:.1%}"),
                        ("Macro F1", f"{r.macro_f1:.3f}"),
                        (f"Calibration (ECE, {ECE_BINS} bins)", calibration(r))]))
    lines += ["", "Per class: sensitivity (recall), specificity, precision, F1, scans"]
    for i, (name, m) in enumerate(r.per_class.items()):
        spec = specificity(r.confusion, i)
        lines.append(f"  {clinical_name(name):<18} {m.recall:6.1%} "
                     f"{'-' if spec is None else f'{spec:6.1%}'} {m.precision:6.1%} "
                     f"{m.f1:.3f} {m.support:5d}")
    lines += ["", "Confusion matrix (rows: actual class, columns: the model's answer)"]
    lines.append(" " * 20 + "".join(f"{clinical_name(n)[:10]:>11}" for n in names))
    for name, row in zip(names, r.confusion, strict=True):
        lines.append(f"  {clinical_name(name):<18}" + "".join(f"{v:>11}" for v in row))
    return "\n".join(lines)


class GetScreen(Screen):
    CSS_PATH = HERE / "get.tcss"
    TITLE = "Get the global weights"
    HELP = ("Downloads the federation's current global model, checks that it arrived "
            "intact, loads it into this hospital's model and tests it on its validation "
            "scans (a share of its Training scans held out of training).  Balanced accuracy: "
            "the mean sensitivity over the classes.  Sensitivity: of the scans of a class, "
            "the share the model found.  Specificity: of the other scans, the share it did "
            "not wrongly call that class.  d shows the full technical report.  If the local "
            "model was trained and its update not sent, you are asked first (No keeps the "
            "training).")
    BINDINGS = [("escape", "back", "Back"), ("enter", "start", "Get weights"),
                Binding("escape", "busy_back", show=False), ("d", "details", "Details")]

    class Evaluated(Message):
        def __init__(self, report: EvalReport | None, error: BaseException | None) -> None:
            super().__init__()
            self.report, self.error = report, error

    class Downloaded(Message):
        """Bubbles to the app: the local model is now global version ``version``."""

        def __init__(self, version: int) -> None:
            super().__init__()
            self.version = version

    def __init__(self, hospital: Hospital,
                 session: Callable[[], HospitalSession | None] | HospitalSession | None
                 ) -> None:
        super().__init__()
        self.hospital = hospital
        self._session = session if callable(session) else (lambda: session)
        self.running = False
        self.version: int | None = None
        self.sha256 = ""
        self.report: EvalReport | None = None

    @property
    def session(self) -> HospitalSession | None:
        return self._session()

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="get"):
            yield Button("Get weights", variant="primary", id="start")
            with Horizontal(classes="bar-row"):
                yield Label("Steps", classes="bar-label", markup=False)
                yield ProgressBar(total=len(STEPS), show_eta=False, id="bar")
            with Horizontal(classes="bar-row"):
                yield Label("Download", classes="bar-label", markup=False)
                yield ProgressBar(total=100, show_eta=False, id="download")
            with Horizontal(classes="bar-row", id="finetune-row"):
                yield Label("Fine-tune", classes="bar-label", markup=False)
                yield ProgressBar(total=100, show_eta=False, id="finetune")
            yield Static("Press Enter (or Get weights) to start.", id="state", markup=False)
            yield Static("", id="summary", markup=False)
            yield Static("", id="warning", markup=False)
            yield DataTable(id="per-class", cursor_type="none")
            yield DataTable(id="confusion", cursor_type="none")
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("start", "back"):
            return not self.running
        if action == "busy_back":
            return self.running
        if action == "details":
            return self.report is not None
        return True

    def _set_running(self, running: bool) -> None:
        self.running = running
        self.query_one("#start", Button).disabled = running
        self.refresh_bindings()

    def connection_changed(self, connected: bool) -> None:
        # The app can lose its connection while it closes and this screen's widgets went:
        # nothing is left to tell then (NoMatches ended the app so in a CI run of Send).
        if not self.running and self.is_attached:
            with contextlib.suppress(NoMatches):
                self.query_one("#state", Static).update(
                    "Connected to the server again: press Enter to get the weights."
                    if connected else
                    "Not connected to the server: the app is reconnecting by itself.")

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        if self.running:
            return
        if self.session is None:
            self.query_one("#state", Static).update(
                "Not connected to the server: the app is reconnecting by itself. Get works "
                "again once it is connected.")
            self.notify("Not connected to the server yet: the app is reconnecting.",
                        severity="error")
            return
        self._set_running(True)
        self.check_then_download()

    @work(exclusive=True, group="get")
    async def check_then_download(self) -> None:
        """A trained, unsent model would be overwritten: ask first (training takes long)."""
        session = self.session
        if session is None:
            self._fail(ConnectionError("not connected to the server"))
            return
        try:
            status = await session.status()
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
                self._set_running(False)
                self.query_one("#state", Static).update(
                    "Kept the trained model. Next: press Escape, then s to send its update.")

        self.app.push_screen(ConfirmScreen(
            f"The local model was trained on version {base} and its update was not sent. "
            "Replace it with the global model (the training is lost)?",
            title="Replace the trained model?"), answered)

    def _begin(self, replace_trained: bool) -> None:
        self._step(0)
        self.query_one("#finetune-row").display = False  # shown once fine-tuning starts
        self.download(replace_trained)

    def action_back(self) -> None:
        if not self.running:
            self.dismiss()

    def action_busy_back(self) -> None:
        self.notify("Please wait until the download and evaluation finish.",
                    severity="warning")

    def action_details(self) -> None:
        if self.report is not None:
            self.app.push_screen(TextScreen(
                f"Evaluation of global version {self.version} (technical)",
                report_details(self.report, self.version, self.sha256)))

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

    def _personalising(self, p: TrainProgress) -> None:
        """The fine-tuning epoch after the download (a minute or more on a real Training
        folder): a third bar appears and follows it, so the screen never looks stuck."""
        self.query_one("#finetune-row").display = True
        bar = self.query_one("#finetune", ProgressBar)
        if bar.total != p.batches:
            bar.update(total=p.batches, progress=0)
        bar.update(progress=p.batch)
        what = ("measuring the batch-norm statistics" if p.stage == "calibrating" else
                "fine-tuning on this hospital's training scans")
        self.query_one("#state", Static).update(
            f"Making the global model this hospital's own: {what}, batch {p.batch} of "
            f"{p.batches}")

    def _fail(self, exc: BaseException, what: str = "Get weights failed") -> None:
        """The reason stays on the screen: a notification fades in seconds, and walking it
        the screen was left saying only "see the message"."""
        self._set_running(False)
        notify_error(self.app, exc, what)
        self.query_one("#state", Static).update(f"{what}: {explain(exc)}")

    @work(exclusive=True, group="download")
    async def download(self, replace_trained: bool = False) -> None:
        session = self.session
        if session is None:
            self._fail(ConnectionError("not connected to the server"))
            return
        try:
            model = await self.hospital.get(
                session, on_progress=self._downloaded, replace_trained=replace_trained,
                on_personalise=lambda p: self.app.call_from_thread(self._personalising, p))
        except Exception as exc:  # shown as a notification
            self._fail(exc)
            return
        self.version, self.sha256 = model.version, model.sha256
        self._step(3, f"Global version {model.version} (from {model.contributors} "
                   "hospitals); testing it on this hospital's validation scans…")
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
            # The download itself succeeded: the version is this hospital's model now.
            self._fail(message.error or RuntimeError("no report"),
                       f"Global version {self.version} was downloaded and is this "
                       "hospital's model now, but testing it on the validation scans failed")
            return
        r = self.report = message.report
        self._set_running(False)
        self._step(4, "Next: press Escape, then t to train this model on your scans "
                   "(d: full report).")
        skipped = describe_skipped(r.skipped, self.hospital.ml.scans_dir)
        why = self.hospital.local_state().personalisation_note  # e.g. each candidate's figure
        self.query_one("#summary", Static).update(
            f"Global version {self.version}{_personalised(self.hospital)}: tested on "
            f"{r.num_samples} {scans_word(r)}s · balanced accuracy {r.balanced_accuracy:.1%}"
            + (f"\n({why[0].upper()}{why[1:]})" if why else "")
            + (f"\n{skipped}" if skipped else ""))
        warning = one_class_warning(r)
        self.query_one("#warning", Static).update(warning)
        self.query_one("#warning", Static).display = bool(warning)
        # (No toast for the warning: it is on the screen, and a toast would cover the
        # results it is about.)
        if skipped:  # the files are listed in the summary too: a short toast, so it does
            # not cover the results for long (the scans scored are Training's validation part)
            self.notify(skipped, title="Some scan files were not used", severity="warning",
                        timeout=10)
        show_report(self.query_one("#per-class", DataTable),
                    self.query_one("#confusion", DataTable), r)


def _personalised(hospital: Hospital) -> str:
    """", recalibrated on this hospital's scans": how ``get`` made the model its own."""
    from securefl.ml.local import PERSONALISATION_LABELS

    how = PERSONALISATION_LABELS.get(hospital.local_state().personalisation)
    return f", {how}" if how else ", as downloaded (not personalised)"


def show_report(per_class: DataTable, confusion: DataTable, r: EvalReport) -> None:
    """Sensitivity and specificity per class, and what the model answered for each actual
    class (rows actual, columns the model's answer)."""
    per_class.clear(columns=True)
    per_class.add_columns("Class", "Sensitivity", "Specificity", "Scans")
    for i, (name, m) in enumerate(r.per_class.items()):
        spec = specificity(r.confusion, i)
        per_class.add_row(clinical_name(name), f"{m.recall:.0%}",
                          "-" if spec is None else f"{spec:.0%}", str(m.support))
    names = list(r.per_class)
    confusion.clear(columns=True)
    confusion.add_columns("Actual ↓ / answer →", *[clinical_name(n) for n in names])
    for name, row in zip(names, r.confusion, strict=True):
        confusion.add_row(clinical_name(name), *[str(v) for v in row])
