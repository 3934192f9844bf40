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
        text = (self.certs.root / "server.toml").read_text()
        text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"')
        text = text.replace("port = 9095", f"port = {port}")
        text = text.replace('["a", "b", "c", "d"]', '["a", "b", "c"]')
        path = self.certs.root / "server-test.toml"
        model_at = text.index("[model]")  # a plain seeded vector instead of the CNN
        path.write_text(text[:model_at] + f"[model]\nparams = {params}\nseed = 0\n")
        return path

    def client_settings(self, name: str, port: int, **changes: object) -> config.ClientSettings:
        path = (self.certs.root / "admin.toml" if name == "admin"
                else self.certs.kit(name) / "hospital.toml")
        s = config.load(path, config.ClientSettings)
        upd = {"host": "127.0.0.1", "port": port, "reply_timeout": 30.0, "round_timeout": 30.0}
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
