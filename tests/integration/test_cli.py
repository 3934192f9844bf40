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


def test_damaged_state_and_wrong_paths_get_one_sentence_and_what_to_do(
        fed: Federation) -> None:
    """Walking it, each of these ended in a Python traceback (exit 1): a hospital's
    global.json or local.json that is not JSON, a cut-off global.npy, an .npz given as the
    update, an output path that is a file, and a server whose schedule.json, store_dir or
    audit_log hold the wrong thing.  Each now says what happened and what to do."""
    port = free_port()
    cfg = _point_at(fed, port)
    toml = fed.server_toml(port, params=D)
    schedule = fed.certs.root / "store" / "schedule.json"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    schedule.write_text('{"schedule_round": "one"}')
    data = config.read_toml(toml)
    data["schedule"] = {"mode": "auto", "every": "after-publish"}
    config.write_toml(toml, data)
    proc = subprocess.Popen([sys.executable, "-m", "securefl", "server", "--config",
                             str(toml)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    said = []  # it starts: the schedule starts afresh, and says so
    for line in proc.stdout:  # type: ignore[union-attr]
        said.append(line)
        if "listening on" in line:
            break
    state = fed.certs.kit("a") / "state"

    def refused(*args: str | Path, code: int = 4) -> str:
        out = _cli(*args)
        assert out.returncode == code, (out.returncode, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, \
            out.stderr
        return out.stderr

    try:
        assert _cli("client", "--config", cfg["a"], "get").returncode == 0
        np.save(fed.tmp / "u.npy", np.full(D, 0.1, np.float32))
        good = (state / "global.json").read_text()
        (state / "global.json").write_text("{not json")
        assert "global.json is damaged" in refused(
            "client", "--config", cfg["a"], "send", "--update", fed.tmp / "u.npy",
            "--samples", "5")
        assert _cli("client", "--config", cfg["a"], "get").returncode == 0  # the way out
        assert (state / "global.json").read_text() != "{not json"
        weights = (state / "global.npy").read_bytes()
        (state / "global.npy").write_bytes(weights[:100])
        assert "global.npy is damaged (cut off or overwritten): run `securefl client get`" \
            in refused("client", "--config", cfg["a"], "send", "--update", fed.tmp / "u.npy",
                       "--samples", "5")
        (state / "global.npy").write_bytes(weights)
        np.savez(fed.tmp / "u.npz", a=np.zeros(D, np.float32))
        assert "is an archive of several arrays (.npz)" in refused(
            "client", "--config", cfg["a"], "send", "--update", fed.tmp / "u.npz",
            "--samples", "5")
        assert "the system refused to read or write" in refused(
            "data", "synth", "--out", fed.tmp / "u.npy", "--train", "8", "--test", "4",
            "--size", "32")
        assert good  # untouched by any of it
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    said.append(proc.stdout.read() if proc.stdout else "")
    assert "holds values that are not a saved schedule: the schedule starts afresh" in \
        "".join(said)
    from securefl.client.hospital import Hospital

    (state / "local.json").write_text("[1, 2")
    site = Hospital(fed.client_settings("a", port, ml=None), None)
    import pytest

    from securefl.errors import DataError
    with pytest.raises(DataError, match=r"local.json is damaged.*get --replace-trained"):
        site.local_state()
    for key, value, why in (("audit_log", str(fed.tmp), "is a folder"),
                            ("store_dir", str(fed.tmp / "u.npy"), "is a file, not a folder")):
        data = config.read_toml(toml)
        data[key] = value
        config.write_toml(toml, data)
        out = _cli("server", "--config", toml)
        assert out.returncode == 3 and why in out.stderr and "Traceback" not in out.stderr, \
            out.stderr
        data[key] = str(fed.certs.root / ("audit.jsonl" if key == "audit_log" else "store"))
        config.write_toml(toml, data)
