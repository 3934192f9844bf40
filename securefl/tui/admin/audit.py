"""Audit log tail: the server's newest entries (who did what; never keys or weights)."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header

from securefl.client.session import AuditEntry

HERE = Path(__file__).parent


class AuditScreen(Screen):
    CSS_PATH = HERE / "audit.tcss"
    BINDINGS = [("escape", "app.pop_screen", "Back")]

    def __init__(self, entries: list[AuditEntry]) -> None:
        super().__init__()
        self.entries = entries

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="audit", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#audit", DataTable)
        table.add_columns("#", "Time (UTC)", "Event", "Who", "Details")
        for e in reversed(self.entries):  # newest first
            table.add_row(str(e.seq), e.time.replace("T", " ")[:19], e.event, e.name, e.detail)
