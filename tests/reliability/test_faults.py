"""Faults resolved by the record (issue 14, items 13-15): a real server process killed right
after a version's rename, a store that cannot be written (read-only, not permitted, disk
full), an audit log that cannot be written, and what the admin sees when the server dies
during ``aggregate``.

Hospitals and the admin run as the ``securefl`` command where what a user reads is the
point (a resumed ``send``, ``admin aggregate``'s stderr), and as sessions in this process
elsewhere.  Storage faults are injected through the server's own write path by the test
hook (``SECUREFL_TEST_FAIL_WRITE``, ``securefl/server/testhook.py``), because CI runs as
root, where ``chmod 555`` stops nothing; the ``chmod`` case runs the server without root's
power to ignore file permissions (``setpriv``) when the suite is root.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.client.session import AdminSession, HospitalSession
from securefl.errors import DataError, ProtocolError, SecureFLError
from securefl.server.audit import read_entries, verify
from securefl.server.store import ModelStore
from securefl.server.testhook import ENV, FAIL_ENV

from .conftest import Site, start

HOSPITALS = ["h00", "h01", "h02"]
PARAMS = 2000
SAMPLES = 10
DELTA = 0.01


def _cli(site: Site, name: str) -> Path:
    """The site's settings file for ``name`` as the ``securefl`` command reads it, pointed
    at this test's server."""
    kit = site.certs.root if name == "admin" else site.certs.kit(name)
    src = kit / ("admin.toml" if name == "admin" else "hospital.toml")
    data = config.read_toml(src)
    data.update(host="127.0.0.1", port=site.port, reply_timeout=60.0, round_timeout=120.0)
    data.pop("ml", None)  # these hospitals send a plain vector (--update), no CNN
    return config.write_toml(kit / f"test-{name}.toml", data)


def securefl(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "securefl", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def spawn(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "securefl", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_log(log: Path, offset: int, text: str, proc: subprocess.Popen,
              timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with log.open("rb") as fh:
            fh.seek(offset)
            if text.encode() in fh.read():
                return
        assert proc.poll() is None, f"the server exited:\n{log.read_text()}"
        time.sleep(0.02)
    raise AssertionError(f"the server never logged {text!r}:\n{log.read_text()}")


def _start_with(toml: Path, log: Path, monkeypatch: pytest.MonkeyPatch, *,
                unprivileged: bool = False, **env: str) -> tuple[subprocess.Popen, int]:
    """The server with ``env`` set; ``unprivileged``: as root, without the capabilities that
    let root write where file permissions say no (so ``chmod 555`` stops it, as it stops a
    server that is not root)."""
    offset = log.stat().st_size if log.exists() else 0
    with monkeypatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        if not unprivileged or os.geteuid() != 0:
            return start(toml, log), offset
        out = log.open("ab")
        proc = subprocess.Popen(
            ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--",
             sys.executable, "-m", "securefl", "server", "--config", str(toml)],
            stdout=out, stderr=subprocess.STDOUT)
        out.close()
        _wait_log(log, offset, "listening on", proc, timeout=60)
        return proc, offset


async def _count(site: Site, n: int, timeout: float = 60) -> None:
    async with AdminSession(site.settings("admin")) as admin:
        async with asyncio.timeout(timeout):
            while await admin.count() < n:
                await asyncio.sleep(0.05)


def _audit(site: Site) -> list[dict]:
    return read_entries(site.root / "audit.jsonl")


def _one_sentence(stderr: str) -> None:
    """What a user reads when a command fails: one ``securefl:`` line, no traceback."""
    assert "Traceback" not in stderr and "Task exception" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("securefl: "), stderr


def _cli_round_killed_at(site: Site, toml: Path, monkeypatch: pytest.MonkeyPatch, hook: str,
                         line: str) -> tuple[dict[str, Path], Path, subprocess.CompletedProcess]:
    """Three hospitals send with the ``securefl`` command, the admin runs ``aggregate``,
    and the server is killed (-9) where the test hook ``hook`` stops it; returns the
    hospitals' settings files, their update file and what ``admin aggregate`` printed."""
    log = site.root / "server.log"
    cfgs = {n: _cli(site, n) for n in HOSPITALS}
    update = site.root / "update.npy"
    np.save(update, np.full(PARAMS, DELTA, np.float32))
    with site.server(toml):  # version 0 written without the hook (it would stop there too)
        pass
    proc, offset = _start_with(toml, log, monkeypatch, **{ENV: hook})
    sends: list[subprocess.Popen] = []
    try:
        for cfg in cfgs.values():
            got = securefl("client", "--config", cfg, "get")
            assert got.returncode == 0, got.stderr
            sends.append(spawn("client", "--config", cfg, "send", "--update", update,
                               "--samples", SAMPLES))
        asyncio.run(_count(site, len(HOSPITALS)))
        agg = spawn("admin", "--config", _cli(site, "admin"), "aggregate")
        _wait_log(log, offset, line, proc)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        out, err = agg.communicate(timeout=60)
        for s in sends:  # the waiting sends end (connection lost), none hangs
            s.communicate(timeout=60)
            assert s.returncode == 6
    finally:
        proc.kill()
        proc.wait()
        for p in sends:
            p.kill()
    return cfgs, update, subprocess.CompletedProcess(agg.args, agg.returncode, out, err)


def test_kill_9_right_after_a_version_rename_is_resolved_by_the_record(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between the rename of version 1 and its audit entry: the restarted server
    records ``aggregated`` for it (reconciled), the chain verifies, the round is not
    "abandoned", and a hospital's resumed ``send`` says version 1 is out and fetches it
    instead of being told to send again (and then refused as stale)."""
    toml = site.server_toml(params=PARAMS, hospitals=HOSPITALS)
    store = site.root / "store"
    cfgs, update, agg = _cli_round_killed_at(
        site, toml, monkeypatch, "renamed",
        f"securefl test hook: stopped after renamed {store / 'v00000001.sflm'}")
    assert agg.returncode == 6
    _one_sentence(agg.stderr)
    assert (store / "v00000001.sflm").exists()
    assert not [e for e in _audit(site) if e["event"] == "aggregated"]  # killed before it

    with site.server(toml):
        entries = _audit(site)
        verify(site.root / "audit.jsonl")
        done = [e for e in entries if e["event"] == "aggregated"]
        assert len(done) == 1 and done[0]["version"] == 1 and done[0]["reconciled"] is True
        assert done[0]["round_id"] == 1 and done[0]["contributors"] == 3
        assert not [e for e in entries if e["event"] == "round-abandoned"]

        resumed = securefl("client", "--config", cfgs["h00"], "send", "--update", update,
                           "--samples", SAMPLES)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "version 1 is out" in resumed.stdout
        said = resumed.stdout + resumed.stderr
        assert "send your update again" not in said and "retrain" not in said
        state = site.certs.kit("h00") / "state"
        assert json.loads((state / "global.json").read_text())["version"] == 1
        record = json.loads((state / "send.json").read_text())
        assert record["stage"] == "published" and record["published_version"] == 1
        told = securefl("client", "--config", cfgs["h01"], "status")
        assert told.returncode == 0 and "version 1 is out" in told.stdout, told.stdout
        # Said once: the next connection hears nothing more about it.
        again = securefl("client", "--config", cfgs["h01"], "status")
        assert "is out" not in again.stdout
    verify(site.root / "audit.jsonl")


def test_the_admin_sees_one_sentence_when_the_server_dies_during_aggregate(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """``admin aggregate`` waiting on the server (here inside the version write) when the
    server is killed: one sentence on stderr, no "Task exception was never retrieved"."""
    toml = site.server_toml(params=PARAMS, hospitals=HOSPITALS)
    tmp = site.root / "store" / "v00000001.sflm.tmp"
    _, _, agg = _cli_round_killed_at(site, toml, monkeypatch, "version",
                                     f"securefl test hook: paused writing {tmp} ")
    assert agg.returncode == 6
    _one_sentence(agg.stderr)
    assert "lost during aggregate" in agg.stderr


async def _send_all(site: Site, names: list[str] = HOSPITALS) -> list[asyncio.Task]:
    async def one(name: str) -> object:
        async with HospitalSession(site.settings(name)) as h:
            await h.get_global()
            return await h.send(np.full(PARAMS, DELTA, np.float32), SAMPLES)

    return [asyncio.create_task(one(n)) for n in names]


@pytest.mark.parametrize("fault", ["EROFS", "ENOSPC", "chmod"])
def test_a_store_that_cannot_be_written_holds_the_result_and_publishes_it_later(
        site: Site, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """Read-only store (EROFS), disk full (ENOSPC, after the optimiser step has turned its
    input into the new weights) or a folder the server may not write (chmod 555): the
    admin is told in one sentence, every hospital's send ends with the round pending
    (none hangs, none is asked to send again), status says so, abort and joins are
    refused with a clear code (never "internal"), and once the store is writable the held
    result is published -- by the timer (EROFS, chmod) or the next ``aggregate`` (ENOSPC)
    -- as the right model, audited ``publish-deferred`` then ``aggregated``."""
    if fault == "chmod" and os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root writes a chmod 555 folder anyway, and setpriv (util-linux), which "
                    "would run the server without that power, is missing")
    flag = site.root / "fault-on"
    by_timer = fault != "ENOSPC"
    toml = site.server_toml(params=PARAMS, hospitals=HOSPITALS,
                            publish_retry=1.0 if by_timer else 600.0)
    store = site.root / "store"
    env = {} if fault == "chmod" else {FAIL_ENV: f"store:{fault}:{flag}"}
    proc, offset = _start_with(toml, site.root / "server.log", monkeypatch,
                               unprivileged=fault == "chmod", **env)

    def break_store() -> None:
        if fault == "chmod":
            store.chmod(0o555)
        else:
            flag.touch()

    def mend_store() -> None:
        if fault == "chmod":
            store.chmod(0o755)
        else:
            flag.unlink()

    async def scenario() -> None:
        tasks = await _send_all(site)
        await _count(site, len(HOSPITALS))
        break_store()
        async with AdminSession(site.settings("admin")) as admin:
            with pytest.raises(DataError) as err:
                await admin.aggregate()
            said = err.value.message
            assert err.value.code == "publish-deferred"
            assert "could not write version 1" in said and "need not send again" in said
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            assert all(o.pending and o.version == 1 for o in outcomes)  # type: ignore[attr-defined]
            st = await admin.status()
            assert (st.phase, st.version, st.round_id) == ("publish-pending", 0, 1)
            with pytest.raises(DataError) as no_abort:
                await admin.abort_round()
            assert no_abort.value.code == "publish-deferred"
            assert "cannot be aborted" in no_abort.value.message
        async with HospitalSession(site.settings("h00")) as h:
            await h.get_global()
            with pytest.raises(DataError) as busy:
                await h.send(np.full(PARAMS, DELTA, np.float32), SAMPLES)
            assert busy.value.code == "publish-deferred"
        events = [e["event"] for e in _audit(site)]
        assert "publish-deferred" in events and "aggregated" not in events
        assert not [e for e in _audit(site) if e.get("code") == "internal"]
        # Stopping now would lose the held version (walking it, an operator stopped the
        # server to fix its store): the first stop signal says so and is not obeyed.
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(_wait_log, site.root / "server.log", offset,
                                "NOT stopping: version 1 of round 1 is held in memory", proc,
                                30)
        assert proc.poll() is None

        mend_store()
        async with AdminSession(site.settings("admin")) as admin:
            if by_timer:
                async with asyncio.timeout(30):
                    while await admin.version() != 1:
                        await asyncio.sleep(0.2)
            else:
                out = await admin.aggregate()
                assert (out.version, out.contributors) == (1, 3)
        for name in HOSPITALS:
            async with HospitalSession(site.settings(name)) as h:
                assert h.published_round == (1, 1)  # told when it comes back
                got = await h.get_global()
        assert got.version == 1
        first = json.loads((store / "v00000001.sflm").read_bytes()[10:].split(b"}")[0] + b"}")
        assert first["contributors"] == 3 and first["total_samples"] == 3 * SAMPLES
        async with HospitalSession(site.settings("h00")) as h:
            v0 = await h.get_global()
        assert v0.version == 1

    try:
        asyncio.run(scenario())
    finally:
        if fault == "chmod":
            store.chmod(0o755)
        proc.kill()
        proc.wait()
    entries = _audit(site)
    verify(site.root / "audit.jsonl")
    order = [e["event"] for e in entries if e["event"] in ("publish-deferred", "aggregated")]
    assert order == ["publish-deferred", "aggregated"]
    assert next(e for e in entries if e["event"] == "aggregated")["deferred"] is True
    # The published model is version 0 plus the round's mean update (FedAvgM's first step):
    # the held result was published, not the optimiser's half-way output of the failure.
    from securefl.server.store import ModelStore

    s = ModelStore(store)
    np.testing.assert_allclose(s.read(1)[1] - s.read(0)[1], DELTA, atol=1e-4)
    assert not list(store.glob("*.tmp"))


def test_an_unwritable_audit_log_stops_new_rounds_until_it_is_writable(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit log cannot be written (disk full): the server says so on its console,
    refuses new rounds with ``audit-unwritable``, keeps serving downloads, and once the
    log is writable writes every held entry in order (the chain verifies) and runs
    rounds again."""
    flag = site.root / "fault-on"
    log = site.root / "server.log"
    toml = site.server_toml(params=PARAMS, hospitals=HOSPITALS)
    proc, offset = _start_with(toml, log, monkeypatch, **{FAIL_ENV: f"audit:ENOSPC:{flag}"})

    async def scenario() -> None:
        # h02 opens a round before the fault: no one joins even a round already open
        # (an external probe got 'joined' into an enrolling retry round).
        early = await _send_all(site, ["h02"])
        async with AdminSession(site.settings("admin")) as admin:
            async with asyncio.timeout(60):
                while "h02" not in (await admin.status()).joined:
                    await asyncio.sleep(0.05)
        flag.touch()
        async with HospitalSession(site.settings("h00")) as h:
            assert (await h.get_global()).version == 0
            with pytest.raises(ProtocolError) as refused:
                await h.send(np.full(PARAMS, DELTA, np.float32), SAMPLES)
            assert refused.value.code == "audit-unwritable"
            assert "audit log" in refused.value.message
        flag.unlink()
        tasks = early + await _send_all(site, ["h00", "h01"])
        await _count(site, len(HOSPITALS))
        async with AdminSession(site.settings("admin")) as admin:
            assert (await admin.aggregate()).version == 1
        await asyncio.gather(*tasks)

    try:
        asyncio.run(scenario())
        _wait_log(log, offset, "cannot write the audit log", proc)
        _wait_log(log, offset, "is writable again", proc)
    finally:
        proc.kill()
        proc.wait()
    verify(site.root / "audit.jsonl")
    entries = _audit(site)
    refused = [e for e in entries if e["event"] == "request-refused"
               and e.get("code") == "audit-unwritable"]
    assert len(refused) == 1  # held while the log was unwritable, written afterwards
    assert refused[0]["seq"] < next(e for e in entries if e["event"] == "aggregated")["seq"]


def test_a_server_killed_once_the_survivor_list_went_out_binds_those_hospitals_at_restart(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed while writing version 1 -- the three hospitals' sum was already unmasked in
    memory.  At the next start the server binds exactly them to base version 0 (audited
    ``round-bound``): a round of two of them, from a client that keeps no send record of
    its own, could be published and differenced against that sum (found by an external
    probe: the binding was lost and a subset's version was published)."""
    toml = site.server_toml(params=PARAMS, hospitals=HOSPITALS)
    _cli_round_killed_at(site, toml, monkeypatch, "version",
                         "securefl test hook: paused writing")
    assert not (site.root / "store" / "v00000001.sflm").exists()

    async def two_of_them() -> str:
        async def hospital(name: str) -> object:
            async with HospitalSession(site.settings(name)) as h:
                await h.get_global()
                return await h.send(np.full(PARAMS, DELTA, np.float32), SAMPLES)

        tasks = [asyncio.create_task(hospital(n)) for n in HOSPITALS[:2]]
        try:
            async with AdminSession(site.settings("admin")) as admin:
                async with asyncio.timeout(60):
                    while len((st := await admin.status()).joined) < 2:
                        await asyncio.sleep(0.05)
                assert st.waiting_for == ("h02",) and st.collected == 0  # held at the door
                with pytest.raises(SecureFLError) as refused:
                    await admin.aggregate()
                assert refused.value.code == "round-not-ready"
                assert await admin.version() == 0
            return refused.value.message
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    with site.server(toml):
        bound = [e for e in _audit(site) if e["event"] == "round-bound"]
        assert [(e["names"], e["base_version"]) for e in bound] == [(HOSPITALS, 0)]
        message = asyncio.run(two_of_them())
        assert "may only combine exactly h00, h01, h02" in message
        assert "still missing: h02" in message
    assert ModelStore(site.root / "store").versions() == [0]
