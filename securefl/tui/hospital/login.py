"""Start screen: which settings file and which hospital, checked against the certificate.

Why ask for the name when the certificate already carries it: the original client asked
for both, and staff who type the wrong kit's settings file learn it here, in plain words,
instead of later from a refused connection.
"""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Static

from securefl.client.hospital import Hospital
from securefl.errors import SecureFLError

HERE = Path(__file__).parent


def open_hospital(config: str, name: str) -> Hospital:
    """The hospital for ``config`` if ``name`` is the one in its certificate, else raises."""
    if not config.strip():
        raise ValueError("type the path of your hospital.toml settings file")
    path = Path(config.strip()).expanduser()
    if not path.exists():  # said for the field, not for a --config the user never typed
        raise ValueError(f"there is no settings file at {path}: check the path typed above "
                         "(your kit's hospital.toml)")
    hospital = Hospital.from_file(path)
    actual = hospital.name
    if name.strip() and name.strip() != actual:
        raise ValueError(f"this settings file's certificate belongs to '{actual}', not "
                         f"'{name.strip()}': check the name or choose your own hospital's "
                         "settings file")
    return hospital


class LoginScreen(Screen):
    """Asks for the settings file and hospital name; posts ``LoggedIn`` when they agree."""

    CSS_PATH = HERE / "login.tcss"
    TITLE = "Sign in"
    HELP = ("Type the path of your hospital's settings file (hospital.toml, from the kit the "
            "federation operator gave you) and, if you like, your hospital's name as on its "
            "certificate, then press Enter or Sign in.  A name typed is checked against the "
            "certificate before the app connects; left empty, the certificate's is used.")

    class LoggedIn(Message):
        def __init__(self, hospital: Hospital, config: Path) -> None:
            super().__init__()
            self.hospital, self.config = hospital, config

    def __init__(self, config: Path | None = None, name: str | None = None, *,
                 auto: bool = True) -> None:
        """``auto``: sign in at once when both are given (not after logging out)."""
        super().__init__()
        self.config, self.hospital_name, self.auto = config, name, auto

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="login"):
            yield Static("Sign in to your hospital  (f1: help, ctrl+q: quit)", id="title",
                         markup=False)
            yield Label("Settings file (hospital.toml from your kit)", markup=False)
            yield Input(str(self.config or ""), placeholder="path/to/hospital.toml",
                        id="config")
            yield Label("Hospital name (optional: checked against the certificate)",
                        markup=False)
            yield Input(self.hospital_name or "", placeholder="as on your certificate",
                        id="name")
            yield Button("Sign in", variant="primary", id="sign-in")
            yield Static("", id="problem", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        if self.config and self.hospital_name and self.auto:
            self.sign_in()
        else:
            self.query_one("#config" if not self.config else "#name", Input).focus()

    @on(Input.Submitted, "#config")
    def _next(self, event: Input.Submitted) -> None:
        """Enter on an empty field stays there, so the next path typed lands in it."""
        if not event.value.strip():
            self.query_one("#problem", Static).update(
                "Type the path of your hospital.toml settings file first.")
            return
        self.query_one("#problem", Static).update("")
        self.query_one("#name", Input).focus()

    @on(Input.Submitted, "#name")
    @on(Button.Pressed, "#sign-in")
    def sign_in(self) -> None:
        config = self.query_one("#config", Input).value
        name = self.query_one("#name", Input).value
        try:
            hospital = open_hospital(config, name)
        except (SecureFLError, ValueError) as exc:
            text = exc.message if isinstance(exc, SecureFLError) else str(exc)
            self.query_one("#problem", Static).update(text)
            return
        self.post_message(self.LoggedIn(hospital, Path(config.strip()).expanduser().resolve()))
