"""The reliability suite: a real ``securefl server`` process on loopback, many hospitals.

Why a separate process for the server: these tests kill it (``kill -9``), starve it of
connections and feed it slow clients; only a real process shows what an operator would
see.  Hospitals run as TLS sessions inside the test process (each with its own
certificate), and every test bounds its own run time.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from securefl import config
from securefl.certs import CertDir

NAMES = [f"h{i:02d}" for i in range(10)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Site:
    """A federation folder: certificates, server settings, model store, audit log."""

    root: Path
    certs: CertDir
    port: int

    def server_toml(self, *, params: int = 2000, hospitals: list[str] | None = None,
                    limits: dict[str, object] | None = None,
                    **round_settings: object) -> Path:
        rs: dict[str, object] = {"enrolment_timeout": 2.0, "step_timeout": 3.0,
                                 "min_clients": 2}
        rs.update(round_settings)
        c = self.certs.root
        data: dict[str, object] = {
            "cert": c / "server.pem", "key": c / "server.key", "ca": c / "ca.pem",
            "crl": c / "crl.pem", "members": c / "members.json",
            "host": "127.0.0.1", "port": self.port,
            "store_dir": self.root / "store", "audit_log": self.root / "audit.jsonl",
            "hospitals": hospitals or NAMES, "round": rs,
            "model": {"params": params, "seed": 1},
        }
        if limits:
            data["limits"] = limits
        return config.write_toml(self.root / "server.toml", data)

    def settings(self, name: str, **changes: object) -> config.ClientSettings:
        path = (self.certs.root / "admin.toml" if name == "admin"
                else self.certs.kit(name) / "hospital.toml")
        s = config.load(path, config.ClientSettings)
        upd = {"host": "127.0.0.1", "port": self.port, "reply_timeout": 60.0,
               "round_timeout": 120.0, "connect_timeout": 30.0}
        upd.update(changes)
        return s.model_copy(update=upd)

    @contextlib.contextmanager
    def server(self, toml: Path, *, timeout: float = 60.0) -> Iterator[subprocess.Popen]:
        """The server process, started and ready; killed (not asked) at the end."""
        proc = start(toml, self.root / "server.log", timeout)
        try:
            yield proc
        finally:
            proc.kill()
            proc.wait()


def start(toml: Path, log: Path, timeout: float = 60.0, *,
          max_files: int | None = None) -> subprocess.Popen:
    """Start ``securefl server``; ``max_files`` caps its open files (RLIMIT_NOFILE)."""

    def limit() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    offset = log.stat().st_size if log.exists() else 0  # only this start's lines count
    out = log.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "securefl", "server", "--config", str(toml)],
                            stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit)
    out.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with log.open("rb") as fh:
            fh.seek(offset)
            if b"listening on" in fh.read():
                return proc
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start in time")


@pytest.fixture(scope="session")
def _certs_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reliability") / "certs"
    CertDir(root).init(["localhost", "127.0.0.1"], NAMES)
    return root


@pytest.fixture
def site(tmp_path: Path, _certs_template: Path) -> Site:
    shutil.copytree(_certs_template, tmp_path / "certs")
    return Site(tmp_path, CertDir(tmp_path / "certs"), free_port())
