"""The headless commands against a server process: output and distinct exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from securefl import config
from securefl.cli import EXIT_CODES
from securefl.errors import (
    CertificateRejectedError,
    NotEnoughSurvivorsError,
    ServerUnreachableError,
    StaleVersionError,
    UpdateAlreadySentError,
)

from .conftest import Federation
from .test_restart import free_port, start_server

D = 1000


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "securefl", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _point_at(fed: Federation, port: int) -> dict[str, Path]:
    paths = {"admin": fed.certs.root / "admin.toml"}
    paths.update({n: fed.certs.kit(n) / "hospital.toml" for n in "abc"})
    for path in paths.values():
        data = config.read_toml(path)
        data.update(host="127.0.0.1", port=port)
        data.pop("ml", None)  # these rounds send plain vectors, not the kit's CNN
        config.write_toml(path, data)
    return paths


def test_headless_round_and_exit_codes(fed: Federation) -> None:
    port = free_port()
    cfg = _point_at(fed, port)
    down = _cli("client", "--config", cfg["a"], "status")
    assert down.returncode == EXIT_CODES[ServerUnreachableError] == 10
    assert "cannot reach" in down.stderr
    proc = start_server(fed.server_toml(port, params=D))
    try:
        for n in "abc":
            got = _cli("client", "--config", cfg[n], "get")
            assert got.returncode == 0 and "global version 0" in got.stdout
            np.save(fed.tmp / f"{n}.npy", np.full(D, 0.1, np.float32))
        # An update for another model is refused before the hospital joins anything (it
        # used to say "joined round 1" first; adversary review).
        np.save(fed.tmp / "short.npy", np.full(D - 1, 0.1, np.float32))
        short = _cli("client", "--config", cfg["a"], "send", "--update", fed.tmp / "short.npy",
                     "--samples", "5")
        assert short.returncode == 4, short.stderr
        assert f"holds {D - 1} values, but the downloaded global model (version 0) has {D}" \
            in short.stderr and "nothing was sent" in short.stderr
        assert "joined" not in short.stdout + short.stderr
        sends = [subprocess.Popen(
            [sys.executable, "-m", "securefl", "client", "--config", str(cfg[n]), "send",
             "--update", str(fed.tmp / f"{n}.npy"), "--samples", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in "abc"]
        while _cli("admin", "--config", cfg["admin"], "count").stdout.strip() != \
                "3 masked updates collected in the current round":
            time.sleep(0.1)
        agg = _cli("admin", "--config", cfg["admin"], "aggregate")
        assert agg.returncode == 0 and "published version 1 from 3 hospitals" in agg.stdout
        assert "unmasking round 1: 3 of 3 hospitals answered" in agg.stdout
        for p in sends:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0 and "published global version 1" in out, err
        assert _cli("admin", "--config", cfg["admin"], "version", "--json").stdout.strip() \
            == '{"version": 1}'
        # People get tables, scripts the JSON lines they always had (issue 16 item 12).
        table = _cli("admin", "--config", cfg["admin"], "hospitals").stdout.splitlines()
        assert table[0].split() == ["hospital", "registered", "online", "in", "round", "sent",
                                    "last", "seen", "(UTC)", "certificate", "expires"]
        assert [row.split()[:5] for row in table[1:]] == [[n, "yes", "no", "no", "no"]
                                                         for n in "abc"]
        rows = [json.loads(line) for line in _cli("admin", "--config", cfg["admin"],
                                                  "hospitals", "--json").stdout.splitlines()]
        assert [sorted(r) for r in rows] == [sorted(["name", "registered", "online", "joined",
                                                     "submitted", "last_seen",
                                                     "cert_expires"])] * 3
        history = _cli("admin", "--config", cfg["admin"], "history").stdout.splitlines()
        assert history[0].split()[:3] == ["version", "published", "(UTC)"]
        assert [line.split()[0] for line in history[1:]] == ["0", "1"]

        again = _cli("client", "--config", cfg["a"], "send", "--update", fed.tmp / "a.npy",
                     "--samples", "5")
        assert again.returncode == EXIT_CODES[UpdateAlreadySentError] == 13
        assert "already in global version 1" in again.stderr
        # A site that lost its state folder's record: the server still refuses the stale base.
        (fed.certs.kit("a") / "state" / "send.json").unlink()
        stale = _cli("client", "--config", cfg["a"], "send", "--update", fed.tmp / "a.npy",
                     "--samples", "5")
        assert stale.returncode == EXIT_CODES[StaleVersionError] == 12
        assert "current version is 1" in stale.stderr

        assert _cli("client", "--config", cfg["b"], "get").returncode == 0  # version 1
        lone = subprocess.Popen(
            [sys.executable, "-m", "securefl", "client", "--config", str(cfg["b"]), "send",
             "--update", str(fed.tmp / "b.npy"), "--samples", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while '"joined": ["b"]' not in _cli("admin", "--config", cfg["admin"], "status",
                                            "--json").stdout:
            assert lone.poll() is None, lone.communicate()
            assert time.monotonic() < deadline, "b never joined"
            time.sleep(0.1)
        few = _cli("admin", "--config", cfg["admin"], "close")
        assert few.returncode == EXIT_CODES[NotEnoughSurvivorsError] == 8
        assert "only 1 hospital" in few.stderr  # the round still waits for more ...
        assert _cli("admin", "--config", cfg["admin"], "abort").returncode == 0  # ... until
        assert lone.wait(timeout=60) == 7 and "send the update again" in lone.stderr.read()
        lone.stderr.close()
        lone.stdout.close()  # type: ignore[union-attr]

        assert _cli("certs", "--dir", fed.certs.root, "revoke", "c").returncode == 0
        refused = _cli("client", "--config", cfg["c"], "status")
        assert refused.returncode == EXIT_CODES[CertificateRejectedError] == 11
        assert "refused this site's certificate" in refused.stderr
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
