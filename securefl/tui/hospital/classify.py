"""Classify a scan: pick an image file, see it, see each class's probability as a bar.

The image is drawn by ``textual-image``: a graphics protocol where the terminal has one
(Kitty, Sixel), unicode half blocks elsewhere.  The prediction is TensorFlow work, so it
runs in a thread worker.
"""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DirectoryTree, Footer, Header, Input, Static
from textual_image.widget import Image

from securefl.client.hospital import IMAGE_SUFFIXES, Hospital
from securefl.tui.common import notify_error

HERE = Path(__file__).parent
BAR_WIDTH = 20


def probability_bars(probs: dict[str, float], width: int = BAR_WIDTH) -> str:
    """Most likely class first; one line per class: name, bar, percentage."""
    lines = []
    for name, p in sorted(probs.items(), key=lambda kv: -kv[1]):
        filled = round(p * width)
        lines.append(f"{name:<11} {'█' * filled}{'░' * (width - filled)} {p:6.1%}")
    return "\n".join(lines)


class ScanTree(DirectoryTree):
    """Folders and image files only."""

    def filter_paths(self, paths: list[Path]) -> list[Path]:  # type: ignore[override]
        return [p for p in paths if p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES]


class ClassifyScreen(Screen):
    CSS_PATH = HERE / "classify.tcss"
    TITLE = "Classify a scan"
    HELP = ("Pick a scan in the tree (Enter on a file) or type its path and press Enter. "
            "The model's answer is shown as a bar per class, most likely first.  Decision "
            "support only: a clinician makes the diagnosis.")
    BINDINGS = [("escape", "back", "Back")]

    class Classified(Message):
        def __init__(self, path: Path, probs: dict[str, float] | None,
                     error: BaseException | None) -> None:
            super().__init__()
            self.path, self.probs, self.error = path, probs, error

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
                yield Static("Pick a scan (Enter on a file).", id="probs")
        yield Footer()

    def action_back(self) -> None:
        self.dismiss()

    @on(DirectoryTree.FileSelected)
    def _picked(self, event: DirectoryTree.FileSelected) -> None:
        self.classify_path(Path(event.path))

    @on(Input.Submitted, "#path")
    def _typed(self, event: Input.Submitted) -> None:
        self.classify_path(Path(event.value.strip()).expanduser())

    def classify_path(self, path: Path) -> None:
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            self.notify(f"{path.name or path} is not a JPEG or PNG file: pick a scan image.",
                        severity="error")
            return
        self.query_one("#scan", Image).image = path
        self.query_one("#probs", Static).update(f"Classifying {path.name}…")
        self.run_classify(path)

    @work(thread=True, exclusive=True, group="classify")
    def run_classify(self, path: Path) -> None:
        try:
            probs = self.hospital.classify(path)
        except Exception as exc:  # shown as a notification
            self.post_message(self.Classified(path, None, exc))
            return
        self.post_message(self.Classified(path, probs, None))

    @on(Classified)
    def _classified(self, message: Classified) -> None:
        probs = self.query_one("#probs", Static)
        if message.error is not None or message.probs is None:
            probs.update(f"Could not classify {message.path.name}.")
            notify_error(self.app, message.error or RuntimeError("no result"),
                         "Classification failed")
            return
        probs.update(f"{message.path.name}\n{probability_bars(message.probs)}\n"
                     "Decision support only: a clinician makes the diagnosis.")
