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
from securefl.ml.train import read_history
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
            metrics = f"{r.get('contributors', 0)} hospitals, {r.get('total_samples', 0)} scans"
        elif event == "train":
            hist = r.get("history", {})
            loss = (hist.get("loss") or [float("nan")])[-1]
            acc = (hist.get("accuracy") or [float("nan")])[-1]
            metrics = (f"accuracy {acc:.1%} on {r.get('num_samples', 0)} scans, loss {loss:.3f}"
                       + (" (cancelled)" if r.get("cancelled") else ""))
        elif event == "evaluate":
            metrics = f"test accuracy {r.get('accuracy', 0):.1%}"
        else:
            metrics = ""
        rows.append((str(r.get("time", "")).replace("T", " ")[:16], event, version, metrics))
    return rows


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
            "evaluation on its test scans, oldest first; the curve is the test accuracy "
            "over time.  Enter (or a click) on a row shows everything that line recorded.")
    BINDINGS = [("escape", "back", "Back"), ("enter", "details", "Details")]

    def __init__(self, hospital: Hospital) -> None:
        super().__init__()
        self.hospital = hospital

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="history"):
            yield Static("Test accuracy over time", id="curve-label")
            yield Sparkline([], id="curve")
            yield DataTable(id="table", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        records = self.records = read_history(self.hospital.ml.history_path)
        table = self.query_one("#table", DataTable)
        table.add_columns("Time (UTC)", "Event", "Version", "Metrics")
        for row in history_rows(records):
            table.add_row(*row)
        if not records:
            self.query_one("#curve-label", Static).update(
                "No history yet: train (t) or get weights (g) first.")
        accs = [float(r["accuracy"]) for r in records if r.get("event") == "evaluate"]
        self.query_one("#curve", Sparkline).data = accs

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
