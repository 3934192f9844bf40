"""Audit log tail: the server's newest entries (who did what; never keys or weights).
Enter on a row shows the entry in full (its details do not fit a column)."""

from __future__ import annotations

import re
from pathlib import Path

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header

from securefl.client.session import AuditEntry
from securefl.tui.common import TextScreen, pairs

HERE = Path(__file__).parent
DETAIL_WIDTH = 24


class AuditScreen(Screen):
    CSS_PATH = HERE / "audit.tcss"
    TITLE = "Audit log"
    HELP = ("The server's newest audit entries, newest first: connections, refusals, "
            "rounds, administrator actions.  Never keys, shares or weights.  Enter (or a "
            "click) on a row shows the entry in full.")
    BINDINGS = [("escape", "app.pop_screen", "Back"), ("enter", "details", "Details")]

    def __init__(self, entries: list[AuditEntry]) -> None:
        super().__init__()
        self.entries = list(reversed(entries))  # newest first

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="audit", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#audit", DataTable)
        table.add_columns("#", "Time (UTC)", "Event", "Who", "Details")
        for e in self.entries:
            detail = e.detail if len(e.detail) <= DETAIL_WIDTH else \
                e.detail[:DETAIL_WIDTH - 1] + "…"
            table.add_row(str(e.seq), e.time.replace("T", " ")[:16], e.event, e.name, detail)

    def action_details(self) -> None:
        row = self.query_one("#audit", DataTable).cursor_row
        if 0 <= row < len(self.entries):
            e = self.entries[row]
            fields = [("Entry", str(e.seq)), ("Time (UTC)", e.time), ("Event", e.event),
                      ("Who", e.name or "-")]
            fields += re.findall(r"(\w+)=(.*?)(?= \w+=|$)", e.detail)
            self.app.push_screen(TextScreen(f"Audit entry {e.seq}", "\n".join(pairs(fields))))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_details()
