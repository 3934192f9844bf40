"""Version history: every global version with its time, contributors, samples and sha256."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header

from securefl.client.session import VersionEntry
from securefl.tui.admin.dashboard import short_time

HERE = Path(__file__).parent


class VersionsScreen(Screen):
    CSS_PATH = HERE / "versions.tcss"
    BINDINGS = [("escape", "app.pop_screen", "Back")]

    def __init__(self, versions: list[VersionEntry]) -> None:
        super().__init__()
        self.versions = versions

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="versions", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#versions", DataTable)
        table.add_columns("Version", "Time (UTC)", "Hospitals", "Samples", "sha256")
        for v in reversed(self.versions):  # newest first
            table.add_row(str(v.version), short_time(v.created), str(v.contributors),
                          str(v.total_samples), v.sha256)
