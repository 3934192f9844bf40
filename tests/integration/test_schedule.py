"""Server-driven rounds (``[schedule] mode = "auto"``, issue 17) over real mutual TLS.

The hospitals here are real ``HospitalSession`` clients that do what the hospital agent does
with a scheduled round: wait for ``round_open`` (or find it in ``welcome.schedule``), download
its base version, send a known update; nobody runs ``aggregate``.  Every published version is
checked against what the hospitals' own updates imply (``tests/outcome.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.client.session import AdminSession, HospitalSession, RoundOutcome
from securefl.errors import ProtocolError, SecureFLError
from securefl.protocol import messages as wm
from securefl.server.audit import read_entries
from securefl.server.store import ModelStore
from tests import outcome

from .conftest import Federation, running
from .test_restart import free_port, start_server

D = 1000


@contextlib.asynccontextmanager
async def hospitals(fed: Federation, port: int, names: str) -> AsyncIterator[
        list[HospitalSession]]:
    """A connected session for each of ``names``, all closed at the end."""
    sessions = [HospitalSession(fed.client_settings(n, port)) for n in names]
    try:
        for h in sessions:
            await h.connect()
        yield sessions
    finally:
        for h in sessions:
            await h.close()


def auto(fed: Federation, *, every: str = "after-publish", deadline: str = "20s",
         start: str = "running", hospitals: tuple[str, ...] = ("a", "b", "c"),
         **round_settings: object) -> config.ServerSettings:
    rs = {"step_timeout": 10.0, **round_settings}
    return fed.server_settings(
        hospitals=list(hospitals), round=config.RoundSettings(**rs),  # type: ignore[arg-type]
        schedule=config.ScheduleSettings(mode="auto", every=every, training_deadline=deadline,
                                         start=start))  # type: ignore[arg-type]


def updates(n: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.05, D).astype(np.float32) for _ in range(n)]


async def next_open(h: HospitalSession, timeout: float = 20.0,
                    after: int = 0) -> wm.RoundOpen | wm.OpenRound:
    """The scheduled round open now (from the welcome or a push) numbered above ``after``."""
    sched = h.schedule
    if sched is not None and sched.open_round is not None and \
            sched.open_round.schedule_round > after:
        return sched.open_round
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        msg = await h.next_schedule_event(max(0.01, end - loop.time()))
        if isinstance(msg, wm.RoundOpen) and msg.schedule_round > after:
            return msg


async def next_closed(h: HospitalSession, number: int, timeout: float = 30.0
                      ) -> wm.RoundClosed:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        msg = await h.next_schedule_event(max(0.01, end - loop.time()))
        if isinstance(msg, wm.RoundClosed) and msg.schedule_round == number:
            return msg


async def take_part(h: HospitalSession, update: np.ndarray, samples: int,
                    after: int = 0) -> tuple[int, RoundOutcome | None]:
    """What an agent does with one scheduled round: train on its base, join, send."""
    opened = await next_open(h, after=after)
    model = await h.get_global()
    assert model.version == opened.base_version
    return opened.schedule_round, await h.send(update, samples)


def events(settings: config.ServerSettings, name: str) -> list[dict]:
    return [e for e in read_entries(settings.audit_log) if e["event"] == name]


def test_auto_schedule_publishes_without_any_admin_action(fed: Federation) -> None:
    """(a) after-publish, three hospitals with known updates: two versions are published
    with no administrator, each equal to the hospitals' weighted mean through FedAvgM."""
    settings = auto(fed)
    samples = [10, 30, 60]
    first, second = updates(3, seed=1), updates(3, seed=2)

    async def main() -> list[tuple[int, RoundOutcome | None]]:
        async with running(settings) as srv:
            async with hospitals(fed, srv.port, "abc") as sessions:
                one = await asyncio.gather(*(take_part(h, u, n) for h, u, n in
                                             zip(sessions, first, samples, strict=True)))
                closed = await asyncio.gather(*(next_closed(h, 1) for h in sessions))
                assert {(c.outcome, c.version) for c in closed} == {("published", 1)}
                # after-publish: the next round opens by itself on version 1.
                two = await asyncio.gather(*(take_part(h, u, n, after=1) for h, u, n in
                                             zip(sessions, second, samples, strict=True)))
            return [*one, *two]

    results = asyncio.run(main())
    assert [(r, o.version if o else None) for r, o in results] == [(1, 1)] * 3 + [(2, 2)] * 3
    store = ModelStore(settings.store_dir)
    w0, w1, w2 = (store.read(v)[1] for v in (0, 1, 2))
    mean1 = outcome.weighted_mean(list(zip(first, samples, strict=True)))
    expected1, momentum = outcome.fedavgm_step(w0, mean1, None)
    outcome.assert_published(w1, expected1, outcome.tolerance(list(zip(first, samples,
                                                                         strict=True))), w0)
    mean2 = outcome.weighted_mean(list(zip(second, samples, strict=True)))
    expected2, _ = outcome.fedavgm_step(w1, mean2, momentum)
    outcome.assert_published(w2, expected2, 2 * outcome.tolerance(
        list(zip(second, samples, strict=True))), w1)
    assert not any(e.get("action") == "aggregate" for e in events(settings, "admin"))
    opened = events(settings, "schedule-open")
    assert [(e["schedule_round"], e["base_version"]) for e in opened[:2]] == [(1, 0), (2, 1)]
    assert [(e["schedule_round"], e["outcome"], e["version"])
            for e in events(settings, "schedule-closed")[:2]] == [(1, "published", 1),
                                                                  (2, "published", 2)]


def test_at_the_deadline_the_round_runs_with_those_who_joined(fed: Federation) -> None:
    """(b) four registered, three take part, one never connects: at the training deadline
    the round runs with the three and publishes their mean."""
    settings = auto(fed, deadline="3s", hospitals=("a", "b", "c", "d"))
    samples = [20, 20, 40]
    ups = updates(3, seed=3)

    async def main() -> list[tuple[int, RoundOutcome | None]]:
        async with running(settings) as srv:
            async def one(name: str, u: np.ndarray, n: int) -> tuple[int, RoundOutcome | None]:
                async with HospitalSession(fed.client_settings(name, srv.port)) as h:
                    return await take_part(h, u, n)

            return await asyncio.gather(*(one(n, u, k) for n, u, k in
                                          zip("abc", ups, samples, strict=True)))

    results = asyncio.run(main())
    assert [o.version if o else None for _, o in results] == [1, 1, 1]
    store = ModelStore(settings.store_dir)
    w0, w1 = store.read(0)[1], store.read(1)[1]
    pairs = list(zip(ups, samples, strict=True))
    expected, _ = outcome.fedavgm_step(w0, outcome.weighted_mean(pairs), None)
    outcome.assert_published(w1, expected, outcome.tolerance(pairs), w0)
    assert store.info(1).contributors == 3
    closed = events(settings, "enrolment-closed")
    assert sorted(closed[0]["members"]) == ["a", "b", "c"]
    # It waited for d until the deadline, on the server's own clock (the round opens when
    # the server starts, before these sessions connect: a client-side clock started later
    # than the round and measured less than 3 s on a loaded machine).
    opened = dt.datetime.fromisoformat(events(settings, "schedule-open")[0]["time"])
    waited = dt.datetime.fromisoformat(closed[0]["time"]) - opened
    assert waited >= dt.timedelta(seconds=2.9), waited


def test_at_the_deadline_too_few_joined_the_round_expires_and_nothing_is_published(
        fed: Federation) -> None:
    """(b) four registered, two join (three are needed): ``expired``, no version."""
    settings = auto(fed, deadline="2s", hospitals=("a", "b", "c", "d"))
    ups = updates(2, seed=4)

    async def main() -> list[object]:
        async with running(settings) as srv:
            async with hospitals(fed, srv.port, "ab") as sessions:
                sends = await asyncio.gather(*(take_part(h, u, 10) for h, u in
                                               zip(sessions, ups, strict=True)),
                                             return_exceptions=True)
                closed = await asyncio.gather(*(next_closed(h, 1) for h in sessions))
                async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                    view = await admin.schedule()
                    version = await admin.version()
            return [sends, closed, view, version]

    sends, closed, view, version = asyncio.run(main())
    for s in sends:  # each send was told its round ended without a version
        assert isinstance(s, ProtocolError) and s.code == "expired", s
    assert {(c.outcome, c.version) for c in closed} == {("expired", None)}
    assert "fewer than 3" in closed[0].message or "only 2 of the 3" in closed[0].message
    assert version == 0 and ModelStore(settings.store_dir).versions() == [0]
    assert view.round is None or view.round.schedule_round > 1
    assert [e["outcome"] for e in events(settings, "schedule-closed")][:1] == ["expired"]


def test_pause_resume_open_and_abort_from_the_admin(fed: Federation) -> None:
    """(d) A paused schedule opens nothing; ``open`` opens a round now, ``abort`` ends it
    (hospitals told ``aborted``), ``resume`` lets the schedule open the next, ``pause``
    keeps an open round running but opens no further one."""
    settings = auto(fed, start="paused")
    ups, samples = updates(3, seed=5), [10, 20, 30]

    async def main() -> None:
        async with running(settings) as srv, \
                AdminSession(fed.client_settings("admin", srv.port)) as admin, \
                hospitals(fed, srv.port, "abc") as sessions:
            assert sessions[0].schedule is not None and sessions[0].schedule.paused
            assert sessions[0].schedule.open_round is None
            await asyncio.sleep(0.6)
            view = await admin.schedule()
            assert view.paused and view.round is None and view.next_open is None
            assert sessions[0].pending_schedule_events() == []
            with pytest.raises(ProtocolError) as refused:  # no round to join
                await sessions[0].get_global()
                await sessions[0].send(ups[0], 10)
            assert refused.value.code == "round-busy"

            assert await admin.open_round() == 1
            opened = await asyncio.gather(*(next_open(h) for h in sessions))
            assert {o.schedule_round for o in opened} == {1}
            await sessions[0].get_global()  # "training"
            view = await admin.schedule()
            assert view.round is not None and view.round.phase == "enrolling"
            assert view.round.hospitals == {"a": "training", "b": "waiting",
                                            "c": "waiting"}
            assert await admin.abort_round() == 1
            closed = await asyncio.gather(*(next_closed(h, 1) for h in sessions))
            assert {c.outcome for c in closed} == {"aborted"}
            assert (await admin.schedule()).round is None

            await admin.resume()
            results = await asyncio.gather(*(take_part(h, u, n, after=1) for h, u, n in
                                             zip(sessions, ups, samples, strict=True)))
            assert [(r, o.version if o else None) for r, o in results] == [(2, 1)] * 3
            await admin.pause()  # round 2 is over; with after-publish round 3 may be
            await asyncio.sleep(0.6)  # open already, and nothing opens after it
            view = await admin.schedule()
            assert view.paused and view.next_open is None
            number = view.round.schedule_round if view.round else 2
            if view.round is not None:
                await admin.abort_round()
            await asyncio.sleep(0.6)
            view = await admin.schedule()
            assert view.round is None
            assert (await admin.schedule()).round is None
            assert number <= 3

    asyncio.run(main())
    actions = [e["action"] for e in events(settings, "admin")]
    assert actions[:4] == ["open", "abort", "resume", "pause"]
    assert [e["outcome"] for e in events(settings, "schedule-closed")][:2] == ["aborted",
                                                                               "published"]
    assert ModelStore(settings.store_dir).versions() == [0, 1]


def test_schedule_actions_are_refused_in_manual_mode(fed: Federation) -> None:
    settings = fed.server_settings()

    async def main() -> None:
        async with running(settings) as srv:
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                for action in (admin.pause, admin.resume, admin.open_round):
                    with pytest.raises(ProtocolError) as refused:
                        await action()
                    assert refused.value.code == "no-schedule"
                    assert "mode = \"auto\"" in refused.value.message
                view = await admin.schedule()
                assert view.mode == "manual" and view.round is None
            async with HospitalSession(fed.client_settings("a", srv.port)) as h:
                assert h.schedule is None

    asyncio.run(main())


def test_a_failed_training_is_shown_per_hospital_and_does_not_stall_the_others(
        fed: Federation) -> None:
    """(e) d reports ``already-sent``: the admin sees it per hospital with the stalled
    reason, the audit has the coarse code only, and the round closes as soon as a, b, c
    are in -- long before its 60 s deadline."""
    settings = auto(fed, deadline="60s", hospitals=("a", "b", "c", "d"))
    ups, samples = updates(3, seed=6), [10, 10, 10]

    async def main() -> tuple[wm.ScheduleView, list, float]:
        async with running(settings) as srv:
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin, \
                    HospitalSession(fed.client_settings("d", srv.port)) as d:
                opened = await next_open(d)
                await d.training_failed(opened.schedule_round, "already-sent")
                view = await admin.schedule()
                start = asyncio.get_running_loop().time()

                async def one(name: str, u: np.ndarray, n: int) -> object:
                    async with HospitalSession(fed.client_settings(name, srv.port)) as h:
                        return await take_part(h, u, n)

                results = await asyncio.gather(*(one(n, u, k) for n, u, k in
                                                 zip("abc", ups, samples, strict=True)))
                took = asyncio.get_running_loop().time() - start
                closed = await next_closed(d, opened.schedule_round)
                assert (closed.outcome, closed.version) == ("published", 1)
            return view, results, took

    view, results, took = asyncio.run(main())
    assert view.round is not None
    assert view.round.hospitals["d"] == "failed:already-sent"
    assert set(view.round.hospitals) == {"a", "b", "c", "d"}
    assert view.stalled is not None and view.stalled.base_version == 0
    assert "d already sent" in view.stalled.reason
    assert [o.version for _, o in results] == [1, 1, 1]
    assert took < 30
    failed = events(settings, "training-failed")
    assert [(e["name"], e["reason"], e["schedule_round"]) for e in failed] == [
        ("d", "already-sent", 1)]
    assert set(failed[0]) <= {"time", "event", "name", "reason", "schedule_round", "seq",
                              "prev"}


def test_training_failed_repeated_or_about_no_open_round_adds_no_audit_line(
        fed: Federation) -> None:
    """Adversary review: one hospital sending ``training_failed`` in a loop, with made-up
    round numbers, grew the audit log (and the console) by a line each, on a server with a
    schedule or without.  Now only the first one about the open round is recorded."""
    for settings in (auto(fed, deadline="60s"), fed.server_settings()):
        async def main(settings=settings) -> None:
            async with running(settings) as srv, \
                    HospitalSession(fed.client_settings("b", srv.port)) as b:
                open_round = (await next_open(b)).schedule_round if \
                    settings.schedule.mode == "auto" else 1
                reasons = ("declined", "training-error", "out-of-memory", "no-scans")
                for n in range(300):
                    await b.training_failed(open_round + 1000 + n, "declined")
                    # cycling the reason codes recorded a line each (adversary re-check)
                    await b.training_failed(open_round, reasons[n % len(reasons)])

        before = len(read_entries(settings.audit_log)) if settings.audit_log.exists() else 0
        asyncio.run(main())
        entries = read_entries(settings.audit_log)[before:]
        failed = [e for e in entries if e["event"] == "training-failed"]
        if settings.schedule.mode == "auto":
            assert [(e["name"], e["reason"]) for e in failed] == [("b", "declined")]
        else:
            assert failed == []
        assert len(entries) < 20, len(entries)


def test_a_round_everyone_else_declined_closes_at_once_and_says_so(fed: Federation) -> None:
    """a joins, b and c decline: the round cannot reach its minimum, so it closes long
    before its 60 s deadline, and what the hospitals and the operator read says why (the
    others declined), not that the deadline passed."""
    settings = auto(fed, deadline="60s")

    async def main() -> tuple[wm.RoundClosed, float]:
        async with running(settings) as srv, \
                HospitalSession(fed.client_settings("a", srv.port)) as a, \
                HospitalSession(fed.client_settings("b", srv.port)) as b, \
                HospitalSession(fed.client_settings("c", srv.port)) as c:
            opened = await next_open(a)
            start = asyncio.get_running_loop().time()
            await a.get_global()
            sending = asyncio.create_task(a.send(updates(1)[0], 10))
            for h in (b, c):
                await h.training_failed(opened.schedule_round, "declined")
            closed = await next_closed(b, opened.schedule_round)
            with pytest.raises(SecureFLError):
                await sending
            return closed, asyncio.get_running_loop().time() - start

    closed, took = asyncio.run(main())
    assert closed.outcome == "expired" and took < 30
    assert "declined or failed to train" in closed.message, closed.message
    assert "deadline" not in closed.message, closed.message
    [entry] = events(settings, "schedule-closed")
    from securefl.server import console

    said = console._schedule_closed(entry)
    assert "declined or failed to train" in said and "deadline" not in said, said


def test_keepalive_keeps_an_idle_connection_open(fed: Federation) -> None:
    settings = fed.server_settings(limits=config.Limits(idle_timeout=1.0))

    async def main() -> None:
        async with running(settings) as srv, \
                HospitalSession(fed.client_settings("a", srv.port)) as kept, \
                HospitalSession(fed.client_settings("b", srv.port)) as idle:
            for _ in range(6):
                await asyncio.sleep(0.4)
                await kept.keepalive()
            assert (await kept.status()).version == 0
            with pytest.raises(SecureFLError):
                await idle.status()

    asyncio.run(main())


def _auto_toml(fed: Federation, port: int) -> Path:
    data = config.read_toml(fed.certs.root / "server.toml")
    data.update(host="127.0.0.1", port=port, hospitals=["a", "b", "c"],
                model={"params": D, "seed": 0}, round={"step_timeout": 10.0},
                schedule={"mode": "auto", "every": "1h", "training_deadline": "60s"})
    return config.write_toml(fed.certs.root / "server-auto.toml", data)


def _stop(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


def test_a_restarted_server_resumes_the_schedule(fed: Federation) -> None:
    """(c) kill -9 between two rounds: the schedule keeps its next opening and its round
    numbers; kill -9 during an open round (one hospital in its masked round): after the
    restart the round is still open with the same deadline, the hospitals take part again
    and the version published equals their updates' mean."""
    port = free_port()
    toml = _auto_toml(fed, port)
    first, second = updates(3, seed=8), updates(3, seed=9)
    samples = [10, 20, 30]
    seen: dict[str, object] = {}

    def hospital(name: str) -> HospitalSession:
        return HospitalSession(fed.client_settings(name, port))

    async def round_one() -> None:
        async def one(name: str, u: np.ndarray, n: int) -> object:
            async with hospital(name) as h:
                return await take_part(h, u, n)

        results = await asyncio.gather(*(one(n, u, k) for n, u, k in
                                         zip("abc", first, samples, strict=True)))
        assert [(r, o.version) for r, o in results] == [(1, 1)] * 3  # type: ignore[union-attr]
        async with AdminSession(fed.client_settings("admin", port)) as admin:
            for _ in range(50):
                view = await admin.schedule()
                if view.round is None:
                    break
                await asyncio.sleep(0.1)
            assert view.round is None and view.next_open is not None
            seen["next_open"] = view.next_open

    async def between_then_during(proc: subprocess.Popen) -> None:
        async with AdminSession(fed.client_settings("admin", port)) as admin:
            view = await admin.schedule()
            assert view.round is None and view.next_open == seen["next_open"]
            assert await admin.open_round() == 2  # numbers never repeat
            async with hospital("a") as a:
                opened = await next_open(a, after=1)
                assert opened.base_version == 1
                seen["deadline"] = opened.deadline
                await a.get_global()
                sending = asyncio.create_task(a.send(second[0], samples[0]))
                for _ in range(100):
                    view = await admin.schedule()
                    if view.round is not None and view.round.hospitals.get("a") == "joined":
                        break
                    await asyncio.sleep(0.05)
                assert view.round is not None and view.round.hospitals["a"] == "joined"
                _stop(proc)
                with pytest.raises(SecureFLError):
                    await sending

    async def after_restart() -> None:
        sessions = [hospital(n) for n in "abc"]
        for h in sessions:
            await h.connect()
        try:
            assert sessions[0].resend_round is not None  # its masked round was abandoned
            for h in sessions:
                assert h.schedule is not None and h.schedule.open_round is not None
                assert h.schedule.open_round.schedule_round == 2
                assert h.schedule.open_round.deadline == seen["deadline"]
            results = await asyncio.gather(*(take_part(h, u, n, after=1) for h, u, n in
                                             zip(sessions, second, samples, strict=True)))
            assert [(r, o.version) for r, o in results] == [(2, 2)] * 3  # type: ignore[union-attr]
        finally:
            for h in sessions:
                await h.close()

    proc = start_server(toml)
    try:
        asyncio.run(round_one())
        _stop(proc)
        proc = start_server(toml)  # between rounds
        asyncio.run(between_then_during(proc))
        proc = start_server(toml)  # during round 2
        asyncio.run(after_restart())
    finally:
        if proc.poll() is None:
            _stop(proc)
    store = ModelStore(fed.certs.root / "store")
    w0, w1, w2 = (store.read(v)[1] for v in (0, 1, 2))
    p1, p2 = list(zip(first, samples, strict=True)), list(zip(second, samples, strict=True))
    e1, momentum = outcome.fedavgm_step(w0, outcome.weighted_mean(p1), None)
    outcome.assert_published(w1, e1, outcome.tolerance(p1), w0)
    e2, _ = outcome.fedavgm_step(w1, outcome.weighted_mean(p2), momentum)
    outcome.assert_published(w2, e2, 2 * outcome.tolerance(p2), w1)
    audit = fed.certs.root / "audit.jsonl"
    opened = [e["schedule_round"] for e in read_entries(audit) if e["event"] == "schedule-open"]
    assert opened == [1, 2]


def test_until_version_pauses_the_schedule_once_that_version_is_published(
        fed: Federation) -> None:
    """``until_version = 1``: the round that publishes version 1 leaves the schedule paused
    (no round 2 opens by itself, also not after "after-publish"), says why in the audit log;
    ``resume`` goes on, and the next version does not pause it again."""
    settings = auto(fed)
    settings = settings.model_copy(update={"schedule": settings.schedule.model_copy(
        update={"until_version": 1})})
    samples = [10, 30, 60]
    first, second = updates(3, seed=3), updates(3, seed=4)

    async def main() -> None:
        async with running(settings) as srv, \
                AdminSession(fed.client_settings("admin", srv.port)) as admin, \
                hospitals(fed, srv.port, "abc") as sessions:
            one = await asyncio.gather(*(take_part(h, u, n) for h, u, n in
                                         zip(sessions, first, samples, strict=True)))
            assert [(r, o.version if o else None) for r, o in one] == [(1, 1)] * 3
            await asyncio.sleep(1.0)  # "after-publish" would have opened round 2 by now
            view = await admin.schedule()
            assert view.paused and view.round is None and view.next_open is None
            # what a restarted server reads back (Scheduler.__init__): still paused
            assert json.loads((settings.store_dir / "schedule.json").read_text()
                              )["paused"] is True
            assert not [e for h in sessions for e in h.pending_schedule_events()
                        if isinstance(e, wm.RoundOpen) and e.schedule_round > 1]
            await admin.resume()
            two = await asyncio.gather(*(take_part(h, u, n, after=1) for h, u, n in
                                         zip(sessions, second, samples, strict=True)))
            assert [(r, o.version if o else None) for r, o in two] == [(2, 2)] * 3
            await asyncio.sleep(1.0)
            view = await admin.schedule()  # past the target: rounds go on by themselves
            assert not view.paused and view.round is not None
            assert view.round.base_version == 2

    asyncio.run(main())
    paused = events(settings, "schedule-paused")
    assert [(e.get("reason"), e.get("version")) for e in paused] == [("until-version", 1)]
    assert ModelStore(settings.store_dir).versions()[:3] == [0, 1, 2]
