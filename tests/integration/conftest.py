"""Fixtures for tests over real TLS on loopback: a federation made by our own ``certs`` code,
a real ``Server`` in the test's event loop, real sessions.  Nothing of ours is mocked.

Tests are plain functions calling ``asyncio.run`` (no pytest-asyncio needed).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from securefl import config
from securefl.certs import CertDir
from securefl.client.session import AdminSession
from securefl.client.transport import Connection
from securefl.protocol.conversation import Conversation, Side
from securefl.server.app import Server

HOSPITALS = ["a", "b", "c", "d"]


@dataclass
class Federation:
    certs: CertDir
    tmp: Path

    def server_settings(self, **changes: object) -> config.ServerSettings:
        s = config.load(self.certs.root / "server.toml", config.ServerSettings)
        base = {"host": "127.0.0.1", "port": 0, "model": config.ModelSettings(params=1000),
                "hospitals": ["a", "b", "c"]}
        base.update(changes)
        return s.model_copy(update=base)

    def server_toml(self, port: int, params: int = 1000) -> Path:
        """A settings file for a server run as its own process (``securefl server``)."""
        data = config.read_toml(self.certs.root / "server.toml")
        data.update(host="127.0.0.1", port=port, hospitals=["a", "b", "c"],
                    model={"params": params, "seed": 0})  # a seeded vector, not the CNN
        return config.write_toml(self.certs.root / "server-test.toml", data)

    def client_settings(self, name: str, port: int, **changes: object) -> config.ClientSettings:
        path = (self.certs.root / "admin.toml" if name == "admin"
                else self.certs.kit(name) / "hospital.toml")
        s = config.load(path, config.ClientSettings)
        # Many of these tests run the unmasked benchmark baseline (masking = "plain"), which
        # a hospital refuses by default: these test hospitals allow it.  The tests of that
        # refusal pass policy=config.HospitalPolicy() (the default) explicitly.
        upd = {"host": "127.0.0.1", "port": port, "reply_timeout": 30.0, "round_timeout": 30.0,
               "policy": config.HospitalPolicy(allow_unmasked=True)}
        upd.update(changes)
        return s.model_copy(update=upd)


@pytest.fixture(scope="session")
def _federation_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Making certificates is not what these tests measure: make them once, copy per test."""
    root = tmp_path_factory.mktemp("fed") / "certs"
    CertDir(root).init(["localhost", "127.0.0.1"], HOSPITALS)
    return root


@pytest.fixture
def fed(tmp_path: Path, _federation_template: Path) -> Federation:
    import shutil

    shutil.copytree(_federation_template, tmp_path / "certs")
    return Federation(CertDir(tmp_path / "certs"), tmp_path)


@contextlib.asynccontextmanager
async def running(settings: config.ServerSettings) -> AsyncIterator[Server]:
    server = Server(settings)
    try:
        await server.start()
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def forged_admin(settings: config.ClientSettings) -> AsyncIterator[AdminSession]:
    """A hospital playing the administrator with a client of its own: our AdminSession
    refuses a hospital's certificate before it asks anything, so this one skips that
    check and sends the admin's requests as they are; the server must refuse them."""
    fake = AdminSession(settings)
    fake._conn = await Connection.open(settings, Conversation("admin", Side.CLIENT))
    try:
        yield fake
    finally:
        await fake.close()
