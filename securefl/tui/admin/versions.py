"""Version history: every global version with its time, contributors and scans; Enter on a
row shows it in full (the fingerprint does not fit a column at 80 columns)."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header

from securefl.client.session import VersionEntry
from securefl.tui.admin.dashboard import short_time
from securefl.tui.common import TextScreen, pairs

HERE = Path(__file__).parent


class VersionsScreen(Screen):
    CSS_PATH = HERE / "versions.tcss"
    TITLE = "Versions"
    HELP = ("Every global version the server published, newest first: when, how many "
            "hospitals' updates it combines and over how many scans.  Enter (or a click) on "
            "a row shows it in full, with its fingerprint (sha256) to compare with a "
            "hospital's.")
    BINDINGS = [("escape", "app.pop_screen", "Back"), ("enter", "details", "Details")]

    def __init__(self, versions: list[VersionEntry]) -> None:
        super().__init__()
        self.versions = list(reversed(versions))  # newest first

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="versions", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#versions", DataTable)
        table.add_columns("Version", "Time (UTC)", "Hospitals", "Scans", "Fingerprint")
        for v in self.versions:
            table.add_row(str(v.version), short_time(v.created), str(v.contributors),
                          str(v.total_samples), v.sha256[:12] + "…")

    def action_details(self) -> None:
        row = self.query_one("#versions", DataTable).cursor_row
        if 0 <= row < len(self.versions):
            v = self.versions[row]
            self.app.push_screen(TextScreen(f"Version {v.version}", "\n".join(pairs([
                ("Version", str(v.version)), ("Published (UTC)", v.created or "-"),
                ("Hospitals combined", str(v.contributors)),
                ("Scans behind it", str(v.total_samples)),
                ("Fingerprint (sha256)", v.sha256)]))))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_details()
