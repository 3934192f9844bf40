"""Issue 16 item 11: what ``securefl server`` tells its operator on the console.

Before, the console said "listening" and then nothing: rounds, refused connections and
expiry warnings were only in ``audit.jsonl``, and Ctrl-C ended it without a word.  Here a
real server process runs a real round over TLS, is refused a certificate of another
federation, and is stopped with SIGINT, and the test reads its console as an operator would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from securefl import config
from securefl.certs import CertDir
from securefl.client.session import AdminSession, HospitalSession
from securefl.errors import CertificateRejectedError, ServerUnreachableError

from .conftest import Federation
from .test_restart import free_port

D = 1000


def _server(fed: Federation, port: int, *flags: str) -> tuple[subprocess.Popen, Path]:
    toml = fed.server_toml(port, params=D)
    data = config.read_toml(toml)
    data["limits"] = {"refusal_summary_interval": 0.5}
    config.write_toml(toml, data)
    # The revocation list runs out in five days: the console must warn about it.
    fed.certs.write_crl(fed.certs.ca(), now=dt.datetime.now(dt.UTC) - dt.timedelta(days=25))
    log = fed.tmp / "console.txt"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "securefl", "server", "--config",
                                 str(toml), *flags], stdout=subprocess.DEVNULL, stderr=out)
    _wait_for(log, "listening on" if "--json-logs" not in flags else "revocation list", proc)
    return proc, log


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"never logged {text!r}:\n{log.read_text()}"
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=30)


def _stranger(tmp: Path, port: int) -> config.ClientSettings:
    """A hospital of another federation (its own CA) knocking on this server."""
    other = CertDir(tmp / "other")
    other.init(["127.0.0.1"], ["a"])
    s = config.load(other.kit("a") / "hospital.toml", config.ClientSettings)
    return s.model_copy(update={"host": "127.0.0.1", "port": port})


async def _refused(settings: config.ClientSettings) -> None:
    # At --log-level warning nothing says "listening" (the expiry warning comes before the
    # port opens): retry while the port refuses, which never reaches the server's count.
    async with asyncio.timeout(60):
        while True:
            try:
                async with HospitalSession(settings):
                    pass
            except ServerUnreachableError:
                await asyncio.sleep(0.1)
                continue
            except CertificateRejectedError:
                return
            raise AssertionError("a stranger's certificate was accepted")


def test_the_console_tells_the_operator_what_happens(fed: Federation) -> None:
    port = free_port()
    proc, log = _server(fed, port)
    try:
        async def scenario() -> None:
            async def send(name: str) -> None:
                async with HospitalSession(fed.client_settings(name, port)) as h:
                    await h.get_global()
                    await h.send(np.full(D, 0.01, np.float32), 10)

            sends = [asyncio.create_task(send(n)) for n in "abc"]
            async with AdminSession(fed.client_settings("admin", port)) as admin:
                while await admin.count() < 3:
                    await asyncio.sleep(0.05)
                await admin.aggregate()
            await asyncio.gather(*sends)
            await _refused(_stranger(fed.tmp, port))

        asyncio.run(scenario())
        _wait_for(log, "refused 1 connection", proc)
    finally:
        code = _stop(proc)
    lines = log.read_text().splitlines()
    text = "\n".join(lines)
    assert code == 0, text
    assert f"listening on 127.0.0.1:{port} at version 0; audit log " \
           f"{fed.certs.root / 'audit.jsonl'}" in text
    assert "WARNING the revocation list expires on" in text
    assert "INFO    round 1 opened on version 0" in text
    assert "round 1: enrolment closed with 3 hospitals (a, b, c)" in text
    assert "INFO    round 1 published version 1 from 3 hospitals" in text
    refused = next(line for line in lines if "refused 1 connection" in line)
    assert "WARNING refused 1 connection that never authenticated" in refused
    assert re.search(r": 1 (tls: .+|closed during handshake) \(busiest: 1 127\.0\.0\.1\)$",
                     refused), refused
    # Ctrl-C: one line, the last one, and exit 0.
    assert lines[-1].endswith("INFO    server stopped (Ctrl-C); every connection closed")
    assert sum("server stopped" in line for line in lines) == 1
    assert "Traceback" not in text


def test_json_logs_and_log_level(fed: Federation) -> None:
    port = free_port()
    proc, log = _server(fed, port, "--json-logs", "--log-level", "warning")
    try:
        asyncio.run(_refused(_stranger(fed.tmp, port)))
        _wait_for(log, "refused 1 connection", proc)
    finally:
        assert _stop(proc) == 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]  # every line JSON
    assert {e["level"] for e in entries} == {"warning"}  # info (listening, rounds) left out
    assert any(e["message"].startswith("the revocation list expires on") for e in entries)
    refused = next(e for e in entries if e["message"].startswith("refused 1 connection"))
    assert refused["event"]["event"] == "connections-refused"
    assert refused["event"]["count"] == 1
