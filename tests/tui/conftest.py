"""Fixtures for the TUI tests: a real federation (our own certificates, tiny synthetic scans,
settings files written by ``build_federation``) and a real ``Server`` in the test's event
loop.  Nothing of ours is mocked: the apps talk mutual TLS to the server on loopback.

Why a template copied per test: certificates, 96 synthetic scans and the server's version 0
(built from the ML spec, which needs TensorFlow) take seconds; each test gets its own copy,
with the folder and a fresh port rewritten in the settings files.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.client.session import AdminSession, HospitalSession
from securefl.demo.federated import DemoSettings, build_federation
from securefl.server.app import Server

#: 70 training scans: the rarest class gets 2, enough for one validation scan of each class.
TINY = DemoSettings(hospitals=2, rounds=1, epochs=1, image_size=32, train_images=70,
                    test_images=16, seed=0, min_validation_per_class=1)


@dataclass
class Fed:
    root: Path
    server_toml: Path
    hospital_tomls: list[Path]
    admin_toml: Path
    port: int

    def server_settings(self, **changes: object) -> config.ServerSettings:
        s = config.load(self.server_toml, config.ServerSettings)
        return s.model_copy(update=changes)

    def client(self, index: int) -> config.ClientSettings:
        """Settings of hospital ``index`` (0-based) for a headless session."""
        return config.load(self.hospital_tomls[index], config.ClientSettings)

    def admin(self) -> config.ClientSettings:
        return config.load(self.admin_toml, config.ClientSettings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def _template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Fed]:
    root = tmp_path_factory.mktemp("tuifed")
    server_toml, hospitals, admin = build_federation(TINY, root, lambda _: None)
    port = int(config.load(server_toml, config.ServerSettings).port)
    server = Server(config.load(server_toml, config.ServerSettings))  # writes version 0
    server.audit.close()
    return root, Fed(root, server_toml, hospitals, admin, port)


def _moved_settings(data: object, old: str, new: str, port: int) -> object:
    """A settings table with its paths under ``old`` moved to ``new`` and its port changed."""
    if isinstance(data, dict):
        return {k: port if k == "port" else _moved_settings(v, old, new, port)
                for k, v in data.items()}
    if isinstance(data, str) and data.startswith(old):
        return new + data[len(old):]
    return data


@pytest.fixture
def fed(tmp_path: Path, _template: tuple[Path, Fed]) -> Fed:
    """A private copy of the template federation, on a fresh port."""
    old_root, tpl = _template
    root = tmp_path / "fed"
    shutil.copytree(old_root, root)
    port = free_port()
    for toml in root.rglob("*.toml"):
        config.write_toml(toml, _moved_settings(config.read_toml(toml), str(old_root),
                                                str(root), port))

    def moved(p: Path) -> Path:
        return root / p.relative_to(old_root)

    return Fed(root, moved(tpl.server_toml), [moved(p) for p in tpl.hospital_tomls],
               moved(tpl.admin_toml), port)


@contextlib.asynccontextmanager
async def running(fed: Fed, **changes: object) -> AsyncIterator[Server]:
    server = Server(fed.server_settings(**changes))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def until(pilot: object, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Let the app run until ``condition()`` holds (bounded: fails after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            app = pilot.app  # type: ignore[attr-defined]
            said = [str(n.message) for n in app._notifications]
            code = getattr(condition, "__code__", None)
            where = f" (the condition at line {code.co_firstlineno} of " \
                f"{Path(code.co_filename).name})" if code else ""
            raise AssertionError(f"condition not reached in {timeout:g} s on {app.screen}"
                                 f"{where}; notifications: {said}")
        await pilot.pause(0.05)  # type: ignore[attr-defined]


#: The fixed update and scan count of a headless hospital (hospitals refuse all-zero ones).
HEADLESS_UPDATE, HEADLESS_SAMPLES = 0.001, 10


async def headless_send(settings: config.ClientSettings, *, scale: float = HEADLESS_UPDATE,
                        leave_after: str | None = None) -> object:
    """Another hospital taking part through its real session with a small fixed update."""
    async with HospitalSession(settings) as h:
        model = await h.get_global()
        update = np.full(model.weights.shape, scale, np.float32)
        return await h.send(update, HEADLESS_SAMPLES,  # type: ignore[arg-type]
                            leave_after=leave_after)


async def wait_collected(fed: Fed, n: int, timeout: float = 30.0) -> None:
    async with AdminSession(fed.admin()) as admin:
        deadline = time.monotonic() + timeout
        while await admin.count() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} updates collected")
            await asyncio.sleep(0.05)


class Told(list[str]):
    """The messages of the notifications raised, and ``titles`` beside them."""

    def __init__(self) -> None:
        super().__init__()
        self.titles: list[str] = []


def notifications_kept(app: object) -> Told:
    """Every notification ``app`` raises from now on, as it is raised.

    Why not ``app._notifications``: a toast leaves it when it expires (5-10 s), and a loaded
    machine can take longer than that to hand the test its next look (CI runs missed
    notifications that had been shown)."""
    told = Told()
    notify = app.notify  # type: ignore[attr-defined]

    def keep(message: str, **kw: object) -> object:
        told.append(str(message))
        told.titles.append(str(kw.get("title", "")))
        return notify(message, **kw)

    app.notify = keep  # type: ignore[attr-defined]
    return told


@pytest.fixture
def snap_compare(snap_compare: Callable) -> Callable:
    """pytest-textual-snapshot's ``snap_compare``, with every text cursor held still.

    Why: a focused Input blinks its cursor every half second, so a snapshot taken on a
    loaded machine caught it in either phase (test_hospital_classified failed so). After
    ``run_before`` each widget's blinking is switched off, which leaves the cursor shown --
    as the stored snapshots have it."""

    def compare(app: object, *args: object, run_before: Callable | None = None,
                **kwargs: object) -> bool:
        async def still(pilot: object) -> None:
            if run_before is not None:
                result = run_before(pilot)
                if asyncio.iscoroutine(result):
                    await result
            for widget in pilot.app.screen.query("*"):  # type: ignore[attr-defined]
                if getattr(widget, "cursor_blink", False):
                    widget.cursor_blink = False
            await pilot.pause()  # type: ignore[attr-defined]

        return snap_compare(app, *args, run_before=still, **kwargs)

    return compare
