"""Crash safety: ``kill -9`` of the server process mid-round, and a version write that fails."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from securefl.client.session import AdminSession, HospitalSession
from securefl.config import ServerSettings
from securefl.errors import DataError, TransportError
from securefl.server.store import ModelStore

from .conftest import Federation

D = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "securefl", "server", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    said = []
    for line in proc.stdout:  # wait for the listening line
        said.append(line)
        if "listening on" in line:
            proc.startup = "".join(said)  # type: ignore[attr-defined]  # what it said first
            return proc
    raise AssertionError(f"server did not start (exit {proc.wait()})")


async def _send_all(fed: Federation, port: int, names: str) -> list:
    async def one(name: str) -> object:
        async with HospitalSession(fed.client_settings(name, port)) as h:
            await h.get_global()
            return await h.send(np.full(D, 0.01, np.float32), 10)

    return [asyncio.create_task(one(n)) for n in names]


async def _collected(fed: Federation, port: int, n: int) -> None:
    async with AdminSession(fed.client_settings("admin", port)) as admin:
        while await admin.count() < n:
            await asyncio.sleep(0.05)


async def _crash_with_every_update_in(fed: Federation, port: int,
                                     proc: subprocess.Popen) -> None:
    """a, b and c send; the server process is killed once every masked input is in."""
    tasks = await _send_all(fed, port, "abc")
    await _collected(fed, port, 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        assert isinstance(outcome, TransportError)


async def _all_send_and_publish(fed: Federation, port: int, version: int) -> None:
    tasks = await _send_all(fed, port, "abc")
    await _collected(fed, port, 3)
    async with AdminSession(fed.client_settings("admin", port)) as admin:
        result = await admin.aggregate()
        assert result.version == version and result.contributors == 3
    await asyncio.gather(*tasks)


def test_kill_9_mid_round_then_restart(fed: Federation) -> None:
    port = free_port()
    config = fed.server_toml(port, params=D)
    store_dir = fed.certs.root / "store"

    async def first_round_then_crash(proc: subprocess.Popen) -> None:
        await _all_send_and_publish(fed, port, 1)
        # Round 2: every update is in the running sum when the server dies.
        await _crash_with_every_update_in(fed, port, proc)

    async def after_restart() -> None:
        for name in "abc":
            async with HospitalSession(fed.client_settings(name, port)) as h:
                assert h.resend_round == 2  # told: your round was abandoned, send again
                assert (await h.get_global()).version == 1
        await _all_send_and_publish(fed, port, 2)

    proc = start_server(config)
    try:
        asyncio.run(first_round_then_crash(proc))
        before = (store_dir / "v00000001.sflm").read_bytes()
        proc = start_server(config)
        asyncio.run(after_restart())
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    store = ModelStore(store_dir)
    assert store.versions() == [0, 1, 2]
    for v in (0, 1, 2):
        store.read(v)  # raises if a version is corrupt
    assert (store_dir / "v00000001.sflm").read_bytes() == before
    # Each round's mean update is 0.01; the server applies FedAvgM (momentum 0.3), and the
    # momentum saved with version 1 survived the kill: v2 = v1 + 0.01 + 0.3 * 0.01.
    np.testing.assert_allclose(store.read(1)[1] - store.read(0)[1], 0.01, atol=1e-4)
    np.testing.assert_allclose(store.read(2)[1] - store.read(1)[1], 0.013, atol=1e-4)
    assert not (store_dir / "server_opt.state.tmp").exists()


FAILING_WRITE = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from securefl.errors import DataError
    from securefl.server.store import ModelStore
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    store = ModelStore(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # like a disk that is full
    try:
        store.write(np.ones(4096, np.float32), contributors=2, total_samples=20)
    except DataError as exc:
        print("refused:", exc)
        sys.exit(0)
    sys.exit(1)
""")


def test_failed_version_write_leaves_the_previous_version_intact(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.write(np.zeros(4096, np.float32), contributors=0, total_samples=0)
    before = (tmp_path / "v00000000.sflm").read_bytes()
    done = subprocess.run([sys.executable, "-c", FAILING_WRITE, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "previous version is intact" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v00000000.sflm"]
    assert (tmp_path / "v00000000.sflm").read_bytes() == before
    reopened = ModelStore(tmp_path)
    assert reopened.latest()[0].version == 0


def test_versions_only_go_up(tmp_path: Path) -> None:
    from securefl.errors import DataError

    store = ModelStore(tmp_path)
    store.write(np.zeros(8, np.float32), contributors=0, total_samples=0)
    store.write(np.ones(8, np.float32), contributors=2, total_samples=5)
    with pytest.raises(DataError):
        store.write(np.ones(8, np.float32), contributors=2, total_samples=5, version=1)
    (tmp_path / "v00000002.sflm.tmp").write_bytes(b"half a version")
    assert ModelStore(tmp_path).latest()[0].version == 1
    assert not (tmp_path / "v00000002.sflm.tmp").exists()


def _limit_file_size() -> None:
    """In the server process: writes past 40 KiB fail (EFBIG), as on a full disk."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))


def test_server_that_cannot_store_a_version_publishes_nothing(fed: Federation) -> None:
    """A store that cannot take the version (here: file size limit, as on a full disk): the
    admin hears in one sentence that the result is held, the hospitals' sends end with the
    round pending (never a hang, never "send again"), the previous version stays
    byte-identical, and the server keeps serving."""
    params = 12_000  # a 48 KB version file: over the limit; the audit log stays under it
    store_dir = fed.certs.root / "store"
    ModelStore(store_dir).write(np.zeros(params, np.float32), contributors=0, total_samples=0)
    before = (store_dir / "v00000000.sflm").read_bytes()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "securefl", "server", "--config",
         str(fed.server_toml(port, params=params))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_limit_file_size)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("securefl server listening"):
            break

    async def scenario() -> None:
        async def one(name: str) -> object:
            async with HospitalSession(fed.client_settings(name, port)) as h:
                await h.get_global()
                return await h.send(np.full(params, 0.01, np.float32), 10)

        tasks = [asyncio.create_task(one(n)) for n in "abc"]
        await _collected(fed, port, 3)
        async with AdminSession(fed.client_settings("admin", port)) as admin:
            with pytest.raises(DataError) as err:
                await admin.aggregate()
            assert err.value.code == "publish-deferred"
            assert "could not write version 1" in err.value.message
            assert "need not send again" in err.value.message
            assert await admin.version() == 0
        for outcome in await asyncio.wait_for(asyncio.gather(*tasks), 30):
            assert outcome.pending and outcome.version == 1  # type: ignore[attr-defined]
        async with HospitalSession(fed.client_settings("a", port)) as h:
            assert (await h.get_global()).version == 0
            with pytest.raises(DataError) as busy:  # no second sum on version 0
                await h.send(np.full(params, 0.01, np.float32), 10)
            assert busy.value.code == "publish-deferred"

    try:
        asyncio.run(scenario())
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert sorted(p.name for p in store_dir.glob("v*")) == ["v00000000.sflm"]
    assert (store_dir / "v00000000.sflm").read_bytes() == before


def test_version_0_from_the_ml_model_spec(fed: Federation) -> None:
    """With a [model.ml] spec, version 0 is the hospitals' seeded CNN (reproducible)."""
    import importlib.util

    from securefl import config
    from securefl.errors import ConfigError
    from securefl.server.app import Server

    ml = {"image_size": 16, "channels": 1, "classes": ["a", "b", "c", "d"],
          "model_kind": "small", "seed": 3}
    settings = [fed.server_settings(model=config.ModelSettings(ml=ml),
                                    store_dir=fed.tmp / f"store{i}") for i in range(2)]
    if importlib.util.find_spec("securefl.ml.model") is None:
        with pytest.raises(ConfigError, match="ML part"):
            Server(settings[0])
        return
    first, second = (Server(s).store.latest() for s in settings)
    assert first[0].length == second[0].length > 0
    assert first[0].sha256 == second[0].sha256
    assert first[0].classes == ("a", "b", "c", "d")


def test_port_in_use_is_a_clear_error(fed: Federation) -> None:
    from securefl.errors import ConfigError

    from .conftest import running

    async def scenario() -> None:
        async with running(fed.server_settings()) as first:
            with pytest.raises(ConfigError, match="cannot listen"):
                async with running(fed.server_settings(port=first.port,
                                                       store_dir=fed.tmp / "other",
                                                       audit_log=fed.tmp / "other.jsonl")):
                    pass

    asyncio.run(scenario())


def test_a_second_server_on_the_same_store_is_refused_and_overwrites_nothing(
        fed: Federation) -> None:
    """A copy of server.toml with only the port changed used to start a second server on
    the same store and audit log: both published a "version 1", the second's file replaced
    the first's under the hospitals, and the audit chain broke (found walking it).  Now the
    second is refused in one sentence, and the first goes on with its versions intact."""
    port = free_port()
    config = fed.server_toml(port, params=D)
    first = start_server(config)
    try:
        async def round_one() -> None:
            tasks = await _send_all(fed, port, "abc")
            await _collected(fed, port, 3)
            async with AdminSession(fed.client_settings("admin", port)) as admin:
                assert (await admin.aggregate()).version == 1
            await asyncio.gather(*tasks)

        asyncio.run(round_one())
        store_dir = fed.certs.root / "store"
        before = {p.name: p.read_bytes() for p in store_dir.glob("v*.sflm")}
        audit = (fed.certs.root / "audit.jsonl").read_bytes()
        import tomllib
        data = tomllib.loads(config.read_text())
        for other in ({}, {"store_dir": str(fed.tmp / "own-store")}):
            data.update(port=free_port(), **other)
            from securefl import config as cfg
            second = cfg.write_toml(fed.certs.root / "server-2.toml", data)
            out = subprocess.run([sys.executable, "-m", "securefl", "server", "--config",
                                  str(second)], capture_output=True, text=True, timeout=60)
            assert out.returncode != 0, out.stdout
            what = "audit log" if other else "model store"
            assert f"another securefl server is already using the {what}" in out.stderr, \
                out.stderr
            assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert {p.name: p.read_bytes() for p in store_dir.glob("v*.sflm")} == before
        assert (fed.certs.root / "audit.jsonl").read_bytes() == audit
        # The first server still serves what it published.
        async def check() -> None:
            async with HospitalSession(fed.client_settings("a", port)) as h:
                got = await h.get_global()
                assert got.version == 1
                assert got.weights.tobytes() == ModelStore(store_dir).read(1)[1].tobytes()

        asyncio.run(check())
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
    # Its lock ends with it: a restart on the same files is not locked out.
    again = start_server(config)
    again.send_signal(signal.SIGTERM)
    again.wait(timeout=30)


def test_a_version_file_already_in_the_store_is_never_replaced(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.write(np.zeros(4, np.float32), contributors=0, total_samples=0)
    # A version 1 copied in by hand (or by another program) after this store was opened.
    other = ModelStore(tmp_path / "elsewhere")
    other.write(np.zeros(4, np.float32), contributors=0, total_samples=0)
    other.write(np.ones(4, np.float32), contributors=2, total_samples=2)
    (tmp_path / "v00000001.sflm").write_bytes((tmp_path / "elsewhere" / "v00000001.sflm")
                                             .read_bytes())
    copied = (tmp_path / "v00000001.sflm").read_bytes()
    with pytest.raises(DataError, match=r"already exists .* nothing was overwritten"):
        store.write(np.full(4, 2, np.float32), contributors=2, total_samples=2)
    assert (tmp_path / "v00000001.sflm").read_bytes() == copied


def _one_plain_round(fed: Federation) -> ServerSettings:
    """Version 1 published by a, b and c (unmasked: these tests are about the files); the
    server's settings, for starting it again."""
    from securefl import config

    from .conftest import running

    settings = fed.server_settings(round=config.RoundSettings(masking="plain"))

    async def one_round() -> None:
        async with running(settings) as srv:
            tasks = await _send_all(fed, srv.port, "abc")
            await _collected(fed, srv.port, 3)
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                assert (await admin.aggregate()).version == 1
            await asyncio.gather(*tasks)

    asyncio.run(one_round())
    return settings


def test_a_missing_or_damaged_newest_version_stops_the_start_and_says_what_to_restore(
        fed: Federation) -> None:
    """Walking it: with v00000001.sflm deleted the server started "at version 1" back at 0,
    hospitals holding version 1 refused its model, and its send advice contradicted get.
    Now it does not start, and says which file to restore; a damaged one says the same."""
    from securefl.server.app import Server

    settings = _one_plain_round(fed)
    newest = settings.store_dir / "v00000001.sflm"
    kept = newest.read_bytes()
    newest.unlink()
    with pytest.raises(DataError, match=r"records version 1 as published, but the model "
                       r"store .* holds versions only up to 0 \(v00000001.sflm missing\): "
                       "restore the missing version file"):
        Server(settings)
    newest.write_bytes(kept[:-7])  # cut off
    with pytest.raises(DataError, match=r"v00000001.sflm is (unreadable|corrupt).*: restore "
                       "that file from a backup"):
        Server(settings)
    newest.write_bytes(kept)  # restored: it starts, at version 1
    assert Server(settings).store.latest()[0].version == 1


def _round_opens(audit_log: Path) -> list[int]:
    import json

    return [e["round_id"] for e in map(json.loads, audit_log.read_text().splitlines())
            if e["event"] == "round-open"]


def test_a_lost_state_file_does_not_start_round_numbers_over(fed: Federation) -> None:
    """With store/state.json gone after a crash mid-round (a disk restored from a backup
    without it, an operator tidying up), the restarted server opened "round 1" again: the
    audit log then told of two different rounds 1, and the hospital program, which records
    the rounds its update went to, refuses a reused number as a server's trick (tested in
    tests/unit/crypto/test_secagg_plus.py), so its update could not reach version 1.  Round
    numbers now continue from the audit log, and the resent updates publish."""
    from securefl import config as cfg

    port = free_port()
    config = fed.server_toml(port, params=D)
    settings = cfg.load(config, cfg.ServerSettings)
    store_dir, audit_log = Path(settings.store_dir), Path(settings.audit_log)

    proc = start_server(config)
    try:
        asyncio.run(_crash_with_every_update_in(fed, port, proc))
        (store_dir / "state.json").unlink()
        proc = start_server(config)
        assert (f"{store_dir / 'state.json'} is missing although the audit log records "
                "rounds up to 1: round numbers continue from the audit log (next: round 2)"
                ) in proc.startup, proc.startup
        asyncio.run(_all_send_and_publish(fed, port, 1))
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    assert _round_opens(audit_log) == [1, 2]
    store = ModelStore(store_dir)
    np.testing.assert_allclose(store.read(1)[1] - store.read(0)[1], 0.01, atol=1e-4)


@pytest.mark.parametrize("content", [b"{\"next_round\": 4, \"resend\": {\"a\"", b"\xff\xfe junk",
                                     b"[1, 2, 3]", b"{\"next_round\": \"seven\"}",
                                     b"{\"published\": {\"a\": 3}}"],
                         ids=["cut-off", "not-text", "not-an-object", "wrong-type",
                              "wrong-shape"])
def test_a_damaged_state_file_stops_the_start_and_says_what_to_do(
        fed: Federation, content: bytes) -> None:
    """A garbage state.json used to be dropped without a word: the server started afresh,
    forgot whose update a crashed round held, and numbered rounds from 1 again.  Now it does
    not start and says how to go on; renamed aside, it starts with the round numbers the
    audit log has reached."""
    from securefl.server.app import Server

    settings = _one_plain_round(fed)
    state = Path(settings.store_dir) / "state.json"
    state.write_bytes(content)
    with pytest.raises(DataError, match=r"the server's round state .*state.json is damaged "
                       r"\(.+\): restore it from a backup, or rename it"):
        Server(settings)
    assert state.read_bytes() == content  # nothing was overwritten
    state.rename(state.with_name("state.json.damaged"))
    server = Server(settings)
    try:
        assert server.coordinator.next_round_id == 2
        assert server.store.latest()[0].version == 1
    finally:
        server.audit.close()
        server._unlock()


def test_a_store_restored_from_an_older_backup_is_named_not_downloaded(
        fed: Federation) -> None:
    """Walking it: a store and audit log restored from a backup taken at version 1, while
    the hospitals held version 3, started "at version 1" without a word; hospitals refused
    its model (versions never go back) and the server told them to "download, retrain and
    send again", which could not help.  Now every side says what happened and who fixes it,
    and nothing of the hospitals' is sent or overwritten."""
    import json
    import shutil

    from securefl import config
    from securefl.cli import EXIT_CODES
    from securefl.errors import StaleVersionError

    from .test_cli import _cli, _point_at

    port = free_port()
    cfg = _point_at(fed, port)
    toml = fed.server_toml(port, params=D)
    settings = config.load(toml, config.ServerSettings)
    backup = fed.tmp / "backup"

    def one_round(version: int) -> None:
        for n in "abc":
            assert _cli("client", "--config", cfg[n], "get").returncode == 0
            np.save(fed.tmp / f"{n}.npy", np.full(D, 0.01 * version, np.float32))
        sends = [subprocess.Popen(
            [sys.executable, "-m", "securefl", "client", "--config", str(cfg[n]), "send",
             "--update", str(fed.tmp / f"{n}.npy"), "--samples", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in "abc"]
        while _cli("admin", "--config", cfg["admin"], "count").stdout.split()[:1] != ["3"]:
            time.sleep(0.1)
        assert f"published version {version}" in _cli("admin", "--config", cfg["admin"],
                                                       "aggregate").stdout
        for p in sends:
            p.communicate(timeout=60)

    proc = start_server(toml)
    try:
        one_round(1)
        shutil.copytree(settings.store_dir, backup / "store")
        shutil.copy(settings.audit_log, backup / "audit.jsonl")
        one_round(2)
        for n in "abc":
            assert _cli("client", "--config", cfg[n], "get").returncode == 0  # all hold v2
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    shutil.rmtree(settings.store_dir)
    shutil.copytree(backup / "store", settings.store_dir)
    shutil.copy(backup / "audit.jsonl", settings.audit_log)
    state = fed.certs.kit("a") / "state"
    held = {f: (state / f).read_bytes() for f in ("global.json", "global.npy")}

    proc = start_server(toml)  # a self-consistent older pair: it starts, at version 1
    try:
        said = ("the server's newest global version is 1, but this hospital already has "
                "version 2: global versions never go back, so the server's model store was "
                "probably restored from an older backup")
        status = _cli("client", "--config", cfg["a"], "status")
        assert status.returncode == 0 and f"warning: {said}" in status.stdout
        get = _cli("client", "--config", cfg["a"], "get")
        assert get.returncode == EXIT_CODES[DataError] == 4 and said in get.stderr, get.stderr
        assert {f: (state / f).read_bytes() for f in held} == held  # nothing overwritten
        send = _cli("client", "--config", cfg["b"], "send", "--update", fed.tmp / "b.npy",
                    "--samples", "5")
        assert send.returncode == EXIT_CODES[DataError] and said in send.stderr, send.stderr
        assert "joined" not in send.stdout + send.stderr and "sending" not in send.stdout

        async def own_client_joins_on_version_2() -> None:
            async with HospitalSession(fed.client_settings("c", port)) as s:
                with pytest.raises(StaleVersionError, match=(
                        r"already holds global version 2, but this server's newest version "
                        r"is 1: its model store has gone back \(restored from an older "
                        r"backup\?\), so nothing was sent; tell the federation operator")):
                    await s.send(np.full(D, 0.01, np.float32), 5, base_version=2)

        asyncio.run(own_client_joins_on_version_2())
    finally:
        proc.send_signal(signal.SIGINT)
        console, _ = proc.communicate(timeout=30)
    # The hospitals' own refusals reached the operator too: each told the server.
    for name in "abc":
        assert (f"refused hospital '{name}'" in console and "it already holds version 2, "
                "newer than this server's newest version 1: the model store has gone back"
                in console), console
    refusals = [e for e in map(json.loads, Path(settings.audit_log).read_text().splitlines())
                if e["event"] == "refused" and e.get("base_version") == 2]
    assert sorted(e["name"] for e in refusals) == ["a", "a", "b", "c"]  # a: status and get


def test_a_version_the_audit_log_lacks_is_recorded_without_inventing_its_round(
        fed: Federation, caplog: pytest.LogCaptureFixture) -> None:
    """Walking QUICKSTART §6 (helper): with an older copy of the audit log put back beside
    a store holding a later version, the console said "round 0 published version 2" and
    "stored but not recorded before the server stopped", neither of which was so."""
    import json
    import logging

    from .conftest import running

    settings = _one_plain_round(fed)
    log_path = Path(settings.audit_log)
    lines = log_path.read_bytes().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if b'"event":"aggregated"' in line)
    log_path.write_bytes(b"".join(lines[:cut]))  # an older copy: before version 1

    async def start() -> None:
        async with running(settings):
            pass

    with caplog.at_level(logging.INFO, logger="securefl"):
        asyncio.run(start())
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("version 1: this version is in the store but not in the audit "
                            "log (the server stopped after storing it, or the log is an "
                            "older copy put back from a backup); recorded now") for m in said
               ), said
    assert "recorded version 1 from 3 hospitals" in said, said
    assert not any("round 0" in m for m in said), said
    entry = [e for e in map(json.loads, log_path.read_text().splitlines())
             if e["event"] == "aggregated"][-1]
    assert entry["reconciled"] and entry["version"] == 1 and entry["round_id"] == 0


@pytest.mark.parametrize("state", ["missing", "older", "kept"])
def test_a_momentum_that_will_restart_is_said_at_start(
        fed: Federation, caplog: pytest.LogCaptureFixture, state: str) -> None:
    """Walking a restore (helper): the operator heard that the server optimiser's momentum
    restarted only at the next aggregate, far from the restore that caused it."""
    import logging
    import shutil

    from securefl.server.optimiser import STATE_FILE

    from .conftest import running

    first = _one_plain_round(fed)
    saved = Path(first.store_dir) / STATE_FILE
    if state == "missing":
        saved.unlink()
    elif state == "older":  # the state of version 1 beside a store whose newest is version 2
        shutil.copy(saved, fed.tmp / "v1.state")

        async def second() -> None:
            async with running(first) as srv:
                await _all_send_and_publish(fed, srv.port, 2)

        asyncio.run(second())
        shutil.copy(fed.tmp / "v1.state", saved)

    async def start() -> None:
        async with running(first):
            pass

    with caplog.at_level(logging.WARNING, logger="securefl"):
        asyncio.run(start())
    said = [r.getMessage() for r in caplog.records]
    if state == "kept":  # the state that goes with the newest version: nothing to say
        assert not any("optimiser" in m for m in said), said
        return
    why = "no saved state" if state == "missing" else \
        "it belongs to model version 1, the latest is 2"
    assert (f"the server optimiser's saved state will not be used ({why}): its momentum "
            "starts again from zero at the next round; no model version is affected"
            ) in said, said
