"""History: global versions downloaded and local metrics over time, from history.jsonl.

The hospital's ML layer writes one line per training and evaluation; the Get screen adds
one per downloaded version.  Read-only; the file is small, so it is read on the UI thread.
The table keeps to a few short columns; Enter on a row opens everything that line recorded.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Sparkline, Static

from securefl.client.hospital import Hospital
from securefl.ml.train import read_history_checked
from securefl.tui.common import TextScreen, pairs

HERE = Path(__file__).parent


def history_rows(records: list[dict]) -> list[tuple[str, str, str, str]]:
    """(time, event, version, metrics) per record, in file order."""
    rows = []
    version = "-"
    for r in records:
        event = str(r.get("event", "?"))
        if event == "get":
            version = str(r.get("version", "-"))
            # Version 0 comes from no hospital: "0 hospitals, 0 scans" read as a fault.
            metrics = ("the starting model, before any round"
                       if not r.get("contributors") else
                       f"{r.get('contributors')} hospitals, {r.get('total_samples', 0)} scans")
        elif event == "train":
            metrics = training_words(r)
        elif event == "evaluate":
            metrics = evaluation_words(r)
        else:
            metrics = ""
        rows.append((str(r.get("time", "")).replace("T", " ")[:16], event, version, metrics))
    return rows


def training_words(record: dict) -> str:
    """A training in the few words the Metrics column shows at 80 columns (the loss and the
    rest are in the row's details).

    Why not the last epoch's accuracy: early stopping keeps an earlier epoch's weights, and
    the CLI reports that epoch's figures, so History showed another number than `train`
    had printed.  A stopped training kept nothing, and that has to come first: a trailing
    "(cancelled)" was cut off at 80 columns, and the row read as a normal run."""
    if record.get("cancelled"):
        return "stopped before the end: nothing kept"
    scans = record.get("num_samples", 0)
    accuracy = list(record.get("history", {}).get("accuracy") or [])
    if not accuracy:
        return f"trained on its {scans} training scans"
    kept = record.get("best_epoch") or 0
    if isinstance(kept, int) and 0 < kept < len(accuracy):
        return f"epoch {kept} kept: accuracy {accuracy[kept - 1]:.1%}, {scans} scans"
    return f"accuracy {accuracy[-1]:.1%} on its {scans} training scans"


def evaluation_words(record: dict) -> str:
    """An evaluation in the words the Get screen uses: balanced accuracy, and on which scans
    (records written before securefl kept the split or the balanced figure say less)."""
    split = {"validation": "validation", "testing": "Testing"}.get(str(record.get("split")))
    n = record.get("num_samples")
    scans = f" on {n} {split} scans" if split and n is not None else (
        f" on {split} scans" if split else "")
    if "balanced_accuracy" in record:
        return f"balanced accuracy {float(record['balanced_accuracy']):.1%}{scans}"
    return f"accuracy {float(record.get('accuracy', 0)):.1%}{scans}"


def validation_curve(records: list[dict]) -> list[float]:
    """Balanced accuracy of the evaluations on validation scans, oldest first: one curve
    of one kind of figure (Testing figures are for reporting, and would mix in)."""
    return [float(r.get("balanced_accuracy", r.get("accuracy", 0.0))) for r in records
            if r.get("event") == "evaluate" and r.get("split", "validation") == "validation"]


def record_details(record: dict) -> str:
    """One history line in full (lists shortened to their last values)."""
    items = []
    for key, value in record.items():
        if isinstance(value, dict):
            for k, v in value.items():
                last = v[-1] if isinstance(v, list) and v else v
                items.append((f"{key}.{k}", f"{last:.4g}" if isinstance(last, float)
                              else str(last)))
        elif isinstance(value, float):
            items.append((key, f"{value:.4g}"))
        else:
            items.append((key, str(value)))
    return "\n".join(pairs(items))


class HistoryScreen(Screen):
    CSS_PATH = HERE / "history.tcss"
    TITLE = "History"
    HELP = ("Every global version this hospital downloaded, every training and every "
            "evaluation, oldest first; the curve is the balanced accuracy on this "
            "hospital's validation scans over time (evaluations on the Testing scans are "
            "listed, not drawn).  Enter (or a click) on a row shows everything that line "
            "recorded.")
    BINDINGS = [("escape", "back", "Back"), ("enter", "details", "Details")]

    def __init__(self, hospital: Hospital) -> None:
        super().__init__()
        self.hospital = hospital

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="history"):
            yield Static("Balanced accuracy on validation scans over time", id="curve-label",
                         markup=False)
            yield Sparkline([], id="curve")
            yield DataTable(id="table", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        path = self.hospital.ml.history_path
        records, damaged = read_history_checked(path)
        self.records = records
        if damaged:
            self.notify(f"{damaged} damaged line(s) in {path} (cut off or overwritten) were "
                        "left out; the rest is shown", severity="warning", timeout=10)
        table = self.query_one("#table", DataTable)
        table.add_columns("Time (UTC)", "Event", "Version", "Metrics")
        for row in history_rows(records):
            table.add_row(*row)
        if not records:
            self.query_one("#curve-label", Static).update(
                "No history yet: train (t) or get weights (g) first.")
        self.query_one("#curve", Sparkline).data = validation_curve(records)

    def action_back(self) -> None:
        self.dismiss()

    def action_details(self) -> None:
        table = self.query_one("#table", DataTable)
        if self.records and 0 <= table.cursor_row < len(self.records):
            record = self.records[table.cursor_row]
            self.app.push_screen(TextScreen(f"History: {record.get('event', '?')}",
                                            record_details(record)))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_details()
