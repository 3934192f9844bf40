"""Classify a scan: pick an image file, see it, see each class's probability as a bar.

The probabilities are calibrated (``securefl.ml.calibration``); the pane names the model
version that answered and marks an answer below ``[ml] confidence_threshold`` as
low-confidence.  A failed classification clears the previous answer.

The image is drawn by ``textual-image``: a graphics protocol where the terminal has one
(Kitty, Sixel), unicode half blocks elsewhere.  The prediction is TensorFlow work, so it
runs in a thread worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DirectoryTree, Footer, Header, Input, Static
from textual_image.widget import Image

from securefl.client.hospital import IMAGE_SUFFIXES, Hospital
from securefl.errors import DataError
from securefl.ml.data import load_image
from securefl.ml.settings import clinical_name
from securefl.ml.train import Classification
from securefl.tui.common import explain, notify_error

HERE = Path(__file__).parent
BAR_WIDTH = 20


def probability_bars(probs: dict[str, float], width: int = BAR_WIDTH) -> str:
    """Most likely class first; one line per class: its clinical name, bar, percentage."""
    names = {name: clinical_name(name) for name in probs}
    w = max(map(len, names.values()), default=0)
    lines = []
    for name, p in sorted(probs.items(), key=lambda kv: -kv[1]):
        filled = round(p * width)
        lines.append(f"{names[name]:<{w}} {'█' * filled}{'░' * (width - filled)} {p:6.1%}")
    return "\n".join(lines)


def describe_answer(name: str, answer: Classification) -> str:
    """What the result pane shows: the bars, which model answered (its version and whether
    its probabilities are calibrated), and the low-confidence and decision-support notes."""
    how = (f"calibrated, temperature {answer.temperature:.2f}" if answer.calibrated
           else "not calibrated")
    lines = [name, probability_bars(answer.probabilities),
             f"Model: {answer.model} ({how}).", *answer.notices(),
             "Decision support only: a clinician makes the diagnosis."]
    return "\n".join(lines)


class ScanTree(DirectoryTree):
    """Folders and image files only."""

    def filter_paths(self, paths: Iterable[Path]) -> list[Path]:
        return [p for p in paths if p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES]


class ClassifyScreen(Screen):
    CSS_PATH = HERE / "classify.tcss"
    TITLE = "Classify a scan"
    HELP = ("Pick a scan in the tree (Enter on a file) or type its path and press Enter. "
            "The model's answer is shown as a bar per class, most likely first, with the "
            "model version that answered.  The probabilities are calibrated on validation "
            "scans; an answer whose most likely class is below the confidence threshold is "
            "marked LOW CONFIDENCE.  Decision support only: a clinician makes the diagnosis.")
    BINDINGS = [("escape", "back", "Back")]

    class Classified(Message):
        def __init__(self, path: Path, answer: Classification | None,
                     error: BaseException | None) -> None:
            super().__init__()
            self.path, self.answer, self.error = path, answer, error

    def __init__(self, hospital: Hospital) -> None:
        super().__init__()
        self.hospital = hospital

    def compose(self) -> ComposeResult:
        root = self.hospital.ml.scans_dir
        start = root / "Testing" if (root / "Testing").is_dir() else root
        yield Header()
        with Horizontal(id="classify"):
            with Vertical(id="pick"):
                yield Input(placeholder="scan path, or pick below", id="path")
                yield ScanTree(start, id="tree")
            with Vertical(id="result"):
                yield Image(None, id="scan")
                yield Static("Pick a scan (Enter on a file).", id="probs", markup=False)
        yield Footer()

    def action_back(self) -> None:
        self.dismiss()

    @on(DirectoryTree.FileSelected)
    def _picked(self, event: DirectoryTree.FileSelected) -> None:
        self.classify_path(Path(event.path))

    @on(Input.Submitted, "#path")
    def _typed(self, event: Input.Submitted) -> None:
        if not event.value.strip():  # Path("") is ".", refused as ". is not a JPEG" (a walk)
            self._refuse("Type the path of a scan image (JPEG or PNG) above, or pick one in "
                         "the folders below.")
            return
        self.classify_path(Path(event.value.strip()).expanduser())

    def _clear(self, text: str) -> None:
        """Forget the previous answer: it must never stand beside another scan's name."""
        self.query_one("#scan", Image).image = None
        self.query_one("#probs", Static).update(text)

    def _refuse(self, sentence: str) -> None:
        self._clear(sentence)
        self.notify(sentence, severity="error")

    def classify_path(self, path: Path) -> None:
        # Each refusal stays in the answer's place as well: the notification fades.
        if not path.exists():
            self._refuse(f"{path} does not exist: check the name and folder, or pick a scan "
                         "below.")
            return
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            self._refuse(f"{path.name or path} is not a JPEG or PNG file: pick a scan image.")
            return
        try:  # the preview decodes the file here: a damaged one must not end the app
            load_image(path, 8, as_scan=True)
            self.query_one("#scan", Image).image = path
        except (DataError, OSError, ValueError) as exc:
            detail = exc.message if isinstance(exc, DataError) else str(exc)
            self._refuse(f"{detail}: pick another scan.")
            return
        self.query_one("#probs", Static).update(f"Classifying {path.name}…")
        self.run_classify(path)

    @work(thread=True, exclusive=True, group="classify")
    def run_classify(self, path: Path) -> None:
        try:
            answer = self.hospital.classify(path)
        except Exception as exc:  # shown as a notification
            self.post_message(self.Classified(path, None, exc))
            return
        self.post_message(self.Classified(path, answer, None))

    @on(Classified)
    def _classified(self, message: Classified) -> None:
        if message.error is not None or message.answer is None:
            self._clear(f"Could not classify {message.path.name}: "
                        f"{explain(message.error or RuntimeError('no result'))}")
            notify_error(self.app, message.error or RuntimeError("no result"),
                         "Classification failed")
            return
        self.query_one("#probs", Static).update(describe_answer(message.path.name,
                                                                message.answer))
