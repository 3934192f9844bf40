"""Pieces both apps use: the base app (help, command palette, guarded quit, reconnect
backoff), the confirmation, help and detail dialogs, a progress bar that draws in any
terminal, and errors turned into notifications.

Why errors go through one function: every ``SecureFLError`` already says what to do next,
so the apps show its message as it is; anything else is a bug and is shown as such (with
the type, not a traceback) so a clinician is never left with a frozen screen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Grid, Vertical, VerticalScroll
from textual.notifications import SeverityLevel
from textual.renderables.bar import Bar as BarRenderable
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Label, ProgressBar, Static

from securefl.errors import (
    CertificateRejectedError,
    NotEnoughSurvivorsError,
    SecureFLError,
    ServerUnreachableError,
    StaleVersionError,
)

HERE = Path(__file__).parent

#: Pressing Ctrl+Q (or Ctrl+C) again within this many seconds quits without asking.
QUIT_AGAIN = 2.0
#: Seconds between reconnection attempts: doubling from the first, never above the last.
BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


def sentence(text: str) -> str:
    """``text`` ending in exactly one full stop (no "right?." or "..")."""
    text = text.rstrip()
    return text if text.endswith((".", "?", "!", "…", ":")) else text + "."


def explain(exc: BaseException) -> str:
    """One or two sentences for people: what went wrong and what to do next."""
    if isinstance(exc, ServerUnreachableError):
        return (f"{sentence(exc.message)} The app keeps trying to reconnect; press r to "
                "try now.")
    if isinstance(exc, CertificateRejectedError):
        return (f"{sentence(exc.message)} Ask the federation administrator for a valid "
                "certificate kit.")
    if isinstance(exc, StaleVersionError):
        return (f"{sentence(exc.message)} Your model is out of date: press g to get the new "
                "global weights, t to train, then s to send.")
    if isinstance(exc, NotEnoughSurvivorsError):
        return (f"{sentence(exc.message)} Too few hospitals have joined the round: ask the "
                "others to send (or wait for them), then try again.")
    if isinstance(exc, SecureFLError):
        return sentence(exc.message)
    return (f"unexpected error ({type(exc).__name__}: {str(exc)[:200]}): please report it; the "
            "app keeps running.")


def outage_words(exc: BaseException, where: str) -> str:
    """Why the app is not connected, short enough for the dashboard's connection line.

    Why there: the full reason is a notification that fades after a few seconds, and a
    walk came back to a dashboard saying only "Not connected since 06:45:06 — trying
    again", with no cause and no next step."""
    if isinstance(exc, ServerUnreachableError):
        return f"no answer from {where}; is the server running?"
    if isinstance(exc, CertificateRejectedError):
        return "the certificates were refused; ask the federation operator"
    first = str(getattr(exc, "message", exc)).split(":")[0].split(";")[0].strip()
    return first[:70] or type(exc).__name__


def notify_error(app: App, exc: BaseException, title: str = "Error") -> None:
    app.notify(explain(exc), title=title, severity="error", timeout=10)


# -- a progress bar that draws in 16- and 256-colour terminals ------------------------------


class GlyphBar(BarRenderable):
    """Filled cells are full blocks, empty cells light shade: the bar shows by its glyphs.

    Why: Textual draws a bar as one line glyph in two colours; in a 256-colour terminal
    (tmux without COLORTERM) the empty part's colour rounds to the background and the filled
    part to nearly it, so people saw only a floating "33%".  The empty cells take the
    widget's text colour, which is always readable.
    """

    FILLED, EMPTY = "█", "░"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = self.width or options.max_width
        start, end = self.highlight_range
        start_cell = max(0, min(width, round(start)))
        end_cell = max(start_cell, min(width, round(end)))
        style = console.get_style(self.highlight_style)
        filled = Style(color=style.color, bold=True)
        yield Text.assemble((self.EMPTY * start_cell, ""),
                            (self.FILLED * (end_cell - start_cell), filled),
                            (self.EMPTY * (width - end_cell), ""), end="")


class Progress(ProgressBar):
    """``ProgressBar`` drawn with ``GlyphBar``; the bar takes the width left over."""

    BAR_RENDERABLE = GlyphBar
    DEFAULT_CSS = """
    Progress { width: 1fr; }
    Progress Bar { width: 1fr; }
    """


# -- dialogs --------------------------------------------------------------------------------


class ConfirmScreen(ModalScreen[bool]):
    """Yes/No dialog with a title and a footer; dismisses with True only on Yes.

    No has the focus unless the caller says otherwise: Enter pressed by habit must never
    destroy anything (log out, abort a round, lose a training, quit mid-round).
    """

    CSS_PATH = HERE / "common.tcss"
    # Distinct actions: the footer shows one key per action.  F1 here because a modal
    # screen's footer shows only its own keys.
    BINDINGS = [("y", "answer(True)", "Yes"), ("n", "answer(False)", "No"),
                ("escape", "cancel", "Cancel"), ("f1", "app.help", "Help"),
                Binding("left,right", "app.focus_next", "Move between Yes and No", show=False)]

    def __init__(self, question: str, *, title: str = "Please confirm",
                 default_no: bool = True, kind: str = "") -> None:
        super().__init__()
        self.question, self.default_no, self.kind = question, default_no, kind
        self.dialog_title = self.title = title

    def on_mount(self) -> None:
        self.query_one("#no" if self.default_no else "#yes", Button).focus()

    def compose(self) -> ComposeResult:
        with Grid(id="dialog") as grid:
            grid.border_title = self.dialog_title
            yield Label(self.question, id="question", markup=False)
            yield Button("Yes (y)", variant="error" if self.default_no else "primary",
                         id="yes")
            yield Button("No (n)", variant="primary" if self.default_no else "default",
                         id="no")
        yield Footer()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    def action_cancel(self) -> None:
        self.dismiss(False)

    @on(Button.Pressed, "#yes")
    def _yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#no")
    def _no(self) -> None:
        self.dismiss(False)


class TextScreen(ModalScreen[None]):
    """A titled, scrollable text with a footer: the help screen and every details view."""

    CSS_PATH = HERE / "common.tcss"
    BINDINGS = [("escape", "dismiss", "Close"), Binding("q", "dismiss", "Close", show=False),
                ("f1", "app.help", "Help")]

    def __init__(self, title: str, body: str, *, kind: str = "detail") -> None:
        super().__init__()
        self.dialog_title, self.body, self.kind = title, body, kind
        self.title = title

    def compose(self) -> ComposeResult:
        with Vertical(id="text-dialog") as box:
            box.border_title = self.dialog_title
            box.border_subtitle = "Esc to close"
            with VerticalScroll(id="text-scroll"):
                yield Static(self.body, id="text-body", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#text-scroll").focus()


class HelpScreen(TextScreen):
    """Every key of the screen it was opened on, with what the screen is for."""

    BINDINGS = [Binding("question_mark,f1", "close_help", "Close help", priority=True)]

    def action_close_help(self) -> None:
        self.dismiss()

    def __init__(self, title: str, body: str) -> None:
        super().__init__(title, body, kind="help")


#: Textual's own bindings, told once under "Everywhere" instead of per screen.
GENERIC_ACTIONS = {"focus_next", "focus_previous", "copy_text", "maximize", "minimize",
                   "command_palette", "help_quit"}
#: Words for keys whose binding carries no description.
KEY_WORDS = {"help": "This help", "quit": "Quit (asks first during training or a round)",
             "command_palette": "Commands: search every action of this screen"}


def screen_keys(app: App, screen: Screen) -> list[tuple[str, str]]:
    """(keys, what they do) for ``screen`` and the app, as the user can press them now.

    Built from the bindings themselves, so the help can never forget a key."""
    rows: dict[str, list[str]] = {}
    for node in (screen, app):
        for key, binding in node._bindings:
            action = binding.action
            name = action.split("(")[0].split(".")[-1]
            if name in GENERIC_ACTIONS:
                continue
            words = binding.description or KEY_WORDS.get(name)
            if not words:
                continue
            if app._check_action_state(action, node) is False:
                words += " (not now)"  # e.g. Cancel while nothing runs
            display = app.get_key_display(Binding(key, action))
            if any(display in keys for keys in rows.values()):
                continue  # the first binding of a key wins (priority ones are the app's)
            rows.setdefault(words, []).append(display)
    return [(", ".join(keys), words) for words, keys in rows.items()]


def help_text(app: App, screen: Screen) -> str:
    about = getattr(screen, "HELP", "") or ""
    keys = screen_keys(app, screen)
    width = max((len(k) for k, _ in keys), default=4)
    lines = [about.strip(), ""] if about else []
    lines.append("Keys on this screen:")
    lines += [f"  {k:<{width}}  {w}" for k, w in keys]
    lines += ["", "Everywhere:",
              f"  {'Tab':<{width}}  Next field or button (Shift+Tab: previous)",
              f"  {'Enter':<{width}}  Press the focused button",
              f"  {'mouse':<{width}}  Click any button, row or field",
              f"  {'ctrl+p':<{width}}  Commands: search every action by name"]
    return "\n".join(lines)


# -- the base app ---------------------------------------------------------------------------


class SecureFLApp(App[int]):
    """What both apps share: help on ``?``/F1, the command palette with the current
    screen's actions, Ctrl+Q / Ctrl+C that ask first while work would be lost, and the
    reconnection backoff."""

    ENABLE_COMMAND_PALETTE = True  # see docs/DECISIONS.md, "Terminal apps (issue 16)"
    BINDINGS = [
        # "?" types into a focused text field; F1 works everywhere, so the footer shows F1.
        Binding("question_mark", "help", "Help", priority=True, show=False),
        Binding("f1", "help", "Help"),
        # The key goes with the action, so the question names the key that was pressed.
        Binding("ctrl+q", "quit('ctrl+q')", "Quit", show=False, priority=True),
        Binding("ctrl+c", "quit('ctrl+c')", "Quit", show=False, priority=True),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._quit_asked = -1e9
        #: What was running when the person quit anyway (``busy_reason``), for the words
        #: printed after the app has gone; None when nothing was.
        self.quit_while: str | None = None
        self._retry_at = 0  # index into BACKOFF of the next reconnection delay
        self._retry_timer: Any = None

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = False) -> None:
        """Notifications are plain text here, whatever ``markup`` says (a screen's
        ``notify`` passes Textual's default, True).  Why: Textual reads "[ml]" or
        "[policy]" in a message as a style tag and drops it (walking it: "has no  table"),
        and our sentences name settings tables that way; none of them uses markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout,
                       markup=False)

    # -- help and commands ----------------------------------------------------------------
    def action_help(self) -> None:
        screen = self.screen
        if isinstance(screen, HelpScreen):
            screen.dismiss()
            return
        title = screen.title or self.title
        self.push_screen(HelpScreen(f"Help — {title}", help_text(self, screen)))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The current screen's own actions first, then help and quit."""
        node: Screen | App  # both have run_action (a DOMNode need not)
        for node in (screen, self):
            for _key, binding in node._bindings:
                name = binding.action.split("(")[0].split(".")[-1]
                if (not binding.description or name in ("help", "quit")
                        or self._check_action_state(binding.action, node) is False):
                    continue
                key = self.get_key_display(binding)
                yield SystemCommand(binding.description, f"key {key}",
                                    partial(self._run_later, node, binding.action))
        yield SystemCommand("Help", "Every key of this screen (? or F1)", self.action_help)
        yield SystemCommand("Quit", "Quit the app (ctrl+q)", self.action_quit)

    def _run_later(self, node: Screen | App, action: str) -> None:
        self.call_later(node.run_action, action)

    # -- quitting -----------------------------------------------------------------------------
    def busy_reason(self) -> str | None:
        """What quitting now would lose, in one sentence; None when nothing would be."""
        return None

    async def action_quit(self, key: str = "ctrl+q") -> None:
        reason = self.busy_reason()
        now = time.monotonic()
        if reason is None or now - self._quit_asked <= QUIT_AGAIN:
            self.quit_while = reason
            self.exit(0)
            return
        self._quit_asked = now
        if isinstance(self.screen, ConfirmScreen) and self.screen.kind == "quit":
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.quit_while = reason
                self.exit(0)

        self.push_screen(ConfirmScreen(
            f"{sentence(reason)} Quit anyway? (Press {key} again to quit at once.)",
            title="Quit securefl?", kind="quit"), answered)

    # -- reconnecting -------------------------------------------------------------------------
    def next_retry(self) -> float:
        """The delay before the next reconnection attempt (doubling, capped)."""
        delay = BACKOFF[min(self._retry_at, len(BACKOFF) - 1)]
        self._retry_at += 1
        return delay

    def schedule_reconnect(self, connect: Callable[[], object]) -> float:
        """Call ``connect`` after the next backoff delay; returns the delay."""
        self.cancel_reconnect()
        delay = self.next_retry()
        self._retry_timer = self.set_timer(delay, connect)
        return delay

    def cancel_reconnect(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.stop()
            self._retry_timer = None

    def connected_again(self) -> None:
        self._retry_at = 0
        self.cancel_reconnect()


def clock() -> str:
    """Local wall-clock time for "as of" labels on stale data."""
    return time.strftime("%H:%M:%S")


def pairs(items: Iterable[tuple[str, str]]) -> Iterator[str]:
    """'label: value' lines, labels padded to one column."""
    items = list(items)
    width = max((len(k) for k, _ in items), default=0)
    for k, v in items:
        yield f"{k + ':':<{width + 1}} {v}"
