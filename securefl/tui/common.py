"""Pieces both apps use: the confirmation dialog and errors turned into notifications.

Why errors go through one function: every ``SecureFLError`` already says what to do next,
so the apps show its message as it is; anything else is a bug and is shown as such (with
the type, not a traceback) so a clinician is never left with a frozen screen.
"""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import App, ComposeResult
from textual.containers import Grid
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from securefl.errors import (
    CertificateRejectedError,
    NotEnoughSurvivorsError,
    SecureFLError,
    ServerUnreachableError,
    StaleVersionError,
)

HERE = Path(__file__).parent


def explain(exc: BaseException) -> str:
    """One or two sentences for people: what went wrong and what to do next."""
    if isinstance(exc, ServerUnreachableError):
        return (f"{exc.message}. Check that the server is running and the address in the "
                "settings file; press r to retry.")
    if isinstance(exc, CertificateRejectedError):
        return (f"{exc.message}. Ask the federation administrator for a valid certificate "
                "kit.")
    if isinstance(exc, StaleVersionError):
        return (f"{exc.message}. Your model is out of date: press g to get the new global "
                "weights, t to train, then s to send.")
    if isinstance(exc, NotEnoughSurvivorsError):
        return (f"{exc.message}. Too few hospitals are online to finish the round: ask the "
                "others to connect and send, then try again.")
    if isinstance(exc, SecureFLError):
        return exc.message
    return (f"unexpected error ({type(exc).__name__}: {str(exc)[:200]}): please report it; the "
            "app keeps running")


def notify_error(app: App, exc: BaseException, title: str = "Error") -> None:
    app.notify(explain(exc), title=title, severity="error", timeout=10)


class ConfirmScreen(ModalScreen[bool]):
    """Yes/No dialog; dismisses with True only on Yes."""

    CSS_PATH = HERE / "common.tcss"
    BINDINGS = [("escape", "dismiss(False)", "Cancel"), ("y", "dismiss(True)", "Yes"),
                ("n", "dismiss(False)", "No")]

    def __init__(self, question: str, *, default_no: bool = False) -> None:
        """``default_no``: No has the focus, so Enter cannot destroy anything by habit."""
        super().__init__()
        self.question, self.default_no = question, default_no

    def on_mount(self) -> None:
        if self.default_no:
            self.query_one("#no", Button).focus()

    def compose(self) -> ComposeResult:
        with Grid(id="dialog"):
            yield Label(self.question, id="question")
            yield Button("Yes", variant="primary", id="yes")
            yield Button("No", id="no")

    @on(Button.Pressed, "#yes")
    def _yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#no")
    def _no(self) -> None:
        self.dismiss(False)
