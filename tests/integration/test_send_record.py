"""Interrupted sends and silent no-ops, over real TLS: what a hospital may do next, decided
by its durable send record, and what the server refuses to publish.

Each round's outcome is checked against the weighted mean of the updates the hospitals
kept (tests/outcome.py), not only its version number.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import numpy as np
import pytest

from securefl import config
from securefl.cli import EXIT_CODES, main
from securefl.client.hospital import Hospital
from securefl.client.session import AdminSession, HospitalSession, RoundAbandonedError
from securefl.config import read_toml, write_toml
from securefl.errors import (
    DataError,
    NotEnoughSurvivorsError,
    ProtocolError,
    TransportError,
    UpdateAlreadySentError,
)
from tests.outcome import assert_published, fedavgm_step, tolerance, weighted_mean

from .conftest import Federation, running

D = 1000


def _site(fed: Federation, name: str, port: int, colluders: int = 1) -> Hospital:
    """A hospital that trains with its own tools: the kit's settings without ``[ml]``."""
    policy = config.HospitalPolicy(allow_unmasked=True, colluders=colluders)
    return Hospital(fed.client_settings(name, port, ml=None, policy=policy), None)


def _no_colluder(fed: Federation, **changes: object) -> config.ServerSettings:
    """A federation that assumes no colluding hospital (c = 0: t = floor(n / 2) + 1)."""
    return fed.server_settings(round=config.RoundSettings(colluders=0), **changes)


def _update(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, D).astype(np.float32)


async def _published(fed: Federation, port: int, name: str = "c") -> np.ndarray:
    """The current global version, fetched without touching any hospital's files."""
    async with HospitalSession(fed.client_settings(name, port)) as s:
        return (await s.get_global()).weights


async def _get(site: Hospital) -> np.ndarray:
    async with site.session() as s:
        return (await site.get(s)).weights


async def _admin_status(fed: Federation, port: int) -> int:
    """``securefl admin status`` as the operator runs it, against this test's server."""
    data = read_toml(fed.certs.root / "admin.toml")
    data.update(host="127.0.0.1", port=port)
    admin_toml = write_toml(fed.certs.root / "admin-here.toml", data)
    return await asyncio.to_thread(main, ["admin", "--config", str(admin_toml), "status"])


async def _wait(admin: AdminSession, what: str, n: int) -> None:
    for _ in range(1500):
        st = await admin.status()
        if len(st.joined if what == "joined" else st.submitted) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} hospitals {what}")


@pytest.mark.parametrize("old_connection", ["closed", "still open"])
def test_a_send_interrupted_while_enrolling_joins_the_same_round_again(
        fed: Federation, old_connection: str) -> None:
    """Ctrl-C during enrolment used to lock the hospital out: 'already joined round 1'."""
    ups = {n: _update(i) for i, n in enumerate("abc")}
    samples = {"a": 10, "b": 20, "c": 30}

    async def scenario() -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        async with running(fed.server_settings()) as srv:
            sites = {n: _site(fed, n, srv.port) for n in "abc"}
            v0 = await _get(sites["a"])
            for n in "bc":
                await _get(sites[n])
            first = sites["a"].session()
            await first.connect()
            assert await sites["a"].send_update(first, ups["a"], samples["a"], 0,
                                                leave_after="join") is None
            if old_connection == "closed":
                await first.close()
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                if old_connection == "closed":  # the server saw it go: out of the round
                    for _ in range(500):
                        if not (await admin.status()).joined:
                            break
                        await asyncio.sleep(0.02)
                    assert (await admin.status()).joined == ()
                else:
                    await _wait(admin, "joined", 1)
                again = sites["a"].session()
                await again.connect()
                steps: list[str] = []
                tasks = [asyncio.create_task(sites["a"].send_update(
                    again, ups["a"], samples["a"], 0, on_step=lambda s: steps.append(s.name)))]
                for n in "bc":
                    s = await sites[n].session().connect()
                    tasks.append(asyncio.create_task(
                        sites[n].send_update(s, ups[n], samples[n], 0)))
                await _wait(admin, "submitted", 3)
                result = await admin.aggregate()
                events = [e.event for e in await admin.audit(200)]
            outcomes = await asyncio.gather(*tasks)
            assert result.contributors == 3 and result.total_samples == 60
            assert {o.round_id for o in outcomes} == {1}  # the same round, not the next
            await first.close()
            record = sites["a"].send_record()
            assert record is not None and record.stage == "published"
            assert record.published_version == 1
            v1 = await _published(fed, srv.port)
            return v0, v1, steps, events

    v0, v1, steps, events = asyncio.run(scenario())
    assert steps[0] == "joined" and steps[-1] == "published"
    parts = [(ups[n], samples[n]) for n in "abc"]
    expected, _ = fedavgm_step(v0, weighted_mean(parts), None)
    assert_published(v1, expected, tolerance(parts), v0)
    assert ("member-replaced" in events) == (old_connection == "still open")
    assert ("member-left" in events) == (old_connection == "closed")


def test_after_the_masked_input_left_the_update_is_never_sent_again_on_that_version(
        fed: Federation) -> None:
    """A hospital that vanished after its masked input is still in the round's result; a
    later send on the same version is refused (exit 13) with what happens next.  (c = 0,
    so t = 2 of 3: with the default c = 1 all three must stay to the end.)"""
    ups = {n: _update(10 + i) for i, n in enumerate("abc")}

    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        async with running(_no_colluder(fed)) as srv:
            sites = {n: _site(fed, n, srv.port, colluders=0) for n in "abc"}
            v0 = await _get(sites["a"])
            for n in "bc":
                await _get(sites[n])
            sessions = {n: await sites[n].session().connect() for n in "abc"}
            tasks = {n: asyncio.create_task(sites[n].send_update(
                sessions[n], ups[n], 10, 0,
                leave_after="masked_input" if n == "a" else None)) for n in "abc"}
            assert await tasks["a"] is None
            await sessions["a"].close()
            record = sites["a"].send_record()
            assert record is not None and record.pending_round == 1
            async with sites["a"].session() as s:
                with pytest.raises(UpdateAlreadySentError,
                                   match=r"already left in round 1.*if that round publishes"):
                    await sites["a"].send_update(s, ups["a"], 10, 0)
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait(admin, "submitted", 3)
                result = await admin.aggregate()
            assert result.contributors == 3
            await asyncio.gather(tasks["b"], tasks["c"])
            for s in sessions.values():
                await s.close()
            return v0, await _published(fed, srv.port)

    v0, v1 = asyncio.run(scenario())
    parts = [(ups[n], 10) for n in "abc"]
    expected, _ = fedavgm_step(v0, weighted_mean(parts), None)
    assert_published(v1, expected, tolerance(parts), v0)


def test_ctrl_c_during_enrolment_says_send_again_and_send_again_works(
        fed: Federation, tmp_path: object) -> None:
    """The user's view: Ctrl-C in the CLI's send, the one-sentence note, send again."""
    async def scenario() -> None:
        async with running(fed.server_settings()) as srv:
            cfg = fed.certs.kit("a") / "hospital.toml"
            kit = read_toml(cfg)
            kit.pop("ml")  # this site trains with its own tools and sends --update
            write_toml(cfg, {**kit, "host": "127.0.0.1", "port": srv.port})
            site = _site(fed, "a", srv.port)
            await _get(site)
            np.save(fed.tmp / "a.npy", _update(3))

            async def cli(*args: str) -> asyncio.subprocess.Process:
                return await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "securefl", "client", "--config", str(cfg), *args,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

            send = ["send", "--update", str(fed.tmp / "a.npy"), "--samples", "7"]
            proc = await cli(*send)
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait(admin, "joined", 1)
                proc.send_signal(signal.SIGINT)
                _, err = await asyncio.wait_for(proc.communicate(), 60)
                assert proc.returncode == 130
                assert "before the masked update left" in err.decode()
                assert "run send again" in err.decode()
                for _ in range(500):  # the server saw it leave
                    if not (await admin.status()).joined:
                        break
                    await asyncio.sleep(0.02)
                proc = await cli(*send)
                await _wait(admin, "joined", 1)
                assert (await admin.status()).joined == ("a",)
                proc.terminate()  # a service stop says the same, with its own exit code
                _, err = await asyncio.wait_for(proc.communicate(), 60)
                assert proc.returncode == 143 and "run send again" in err.decode()

    asyncio.run(scenario())


def test_hospitals_refuse_updates_that_would_add_nothing(fed: Federation) -> None:
    async def scenario() -> None:
        async with running(fed.server_settings()) as srv:
            site = _site(fed, "a", srv.port)
            await _get(site)
            async with site.session() as s:
                with pytest.raises(DataError, match=r"all zeros.*train before sending"):
                    await site.send_update(s, np.zeros(D, np.float32), 10, 0)
                # Below the server's fixed-point precision: every value encodes to 0.
                with pytest.raises(DataError, match="below the federation's precision"):
                    await site.send_update(s, np.full(D, 1e-9, np.float32), 10, 0)

    asyncio.run(scenario())


def test_the_precision_refusal_does_not_depend_on_the_servers_encoding(
        fed: Federation) -> None:
    """A server that varies its scale must not learn the update's magnitude from which
    attempts a hospital refuses: the check uses the hospital's own [policy] min_scale, and
    a coarser server encoding is refused whatever the update (an adversary run found the
    refusal depended on the server's scale)."""
    tiny = np.full(D, 1e-4, np.float32)  # 1e-4 * 10 scans * 64 < 0.5: below precision
    small = np.full(D, 1e-3, np.float32)  # 1e-3 * 10 * 64 >= 0.5: fine at any scale
    outcomes: dict[str, list[str]] = {}

    async def attempt(settings: config.ServerSettings) -> list[str]:
        seen = []
        async with running(settings) as srv:
            for up in (tiny, small):
                site = _site(fed, "a", srv.port)
                await _get(site)
                async with site.session() as s:
                    task = asyncio.create_task(site.send_update(s, up, 10, 0))
                    await asyncio.sleep(0.5)
                    if task.done() and task.exception() is not None:
                        seen.append(type(task.exception()).__name__)
                    else:
                        seen.append("joined")
                        task.cancel()
                (site.state_dir / "send.json").unlink(missing_ok=True)
        return seen

    for name, max_weight in (("fine", 100), ("default", 10_000), ("coarse", 10_000_000)):
        settings = fed.server_settings(round=config.RoundSettings(max_weight=max_weight))
        outcomes[name] = asyncio.run(attempt(settings))
    assert outcomes["fine"] == outcomes["default"] == ["DataError", "joined"]
    assert outcomes["coarse"] == ["CryptoError", "CryptoError"]  # refused whatever the update


def test_the_server_refuses_to_publish_an_all_zero_mean(fed: Federation) -> None:
    """Two updates that cancel exactly: nothing is published, the admin is told why, the
    audit log records it and the hospitals hear that the round was abandoned."""
    up = _update(5)

    async def scenario() -> None:
        async with running(_no_colluder(fed, hospitals=["a", "b"])) as srv:
            sites = {n: _site(fed, n, srv.port, colluders=0) for n in "ab"}
            for site in sites.values():
                await _get(site)
            sessions = {n: await sites[n].session().connect() for n in "ab"}
            tasks = [asyncio.create_task(sites["a"].send_update(sessions["a"], up, 10, 0)),
                     asyncio.create_task(sites["b"].send_update(sessions["b"], -up, 10, 0))]
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait(admin, "submitted", 2)
                with pytest.raises(DataError, match=r"all zeros.*nothing was published"):
                    await admin.aggregate()
                assert await admin.version() == 0
                events = [e.event for e in await admin.audit()]
                assert "refused-publish" in events
            for t in tasks:
                with pytest.raises(RoundAbandonedError):
                    await t
            for s in sessions.values():
                await s.close()

    asyncio.run(scenario())


def test_exit_code_13_is_documented() -> None:
    from pathlib import Path

    quickstart = (Path(__file__).resolve().parents[2] / "docs" / "QUICKSTART.md").read_text()
    assert EXIT_CODES[UpdateAlreadySentError] == 13
    assert "| 13 |" in quickstart


def test_a_round_that_fails_while_a_hospital_is_away_is_announced_when_it_returns(
        fed: Federation) -> None:
    """Two hospitals (c = 0, t = 2); one vanishes after its masked input, so the round
    cannot be unmasked.  No list with a's update could gather t = 2 signatures without its
    own, so the server ends the round before any list goes out (it used to send {a, b}
    out, binding b to a round of exactly a and b).  When a reconnects the server tells it
    the round ended without a version, and the two publish the next one together."""
    ups = {n: _update(20 + i) for i, n in enumerate("ab")}

    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        async with running(_no_colluder(fed, hospitals=["a", "b"])) as srv:
            sites = {n: _site(fed, n, srv.port, colluders=0) for n in "ab"}
            v0 = await _get(sites["a"])
            await _get(sites["b"])
            gone = await sites["a"].session().connect()
            stays = await sites["b"].session().connect()
            left = asyncio.create_task(sites["a"].send_update(gone, ups["a"], 10, 0,
                                                              leave_after="masked_input"))
            waiting = asyncio.create_task(sites["b"].send_update(stays, ups["b"], 10, 0))
            assert await left is None
            await gone.close()
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait(admin, "submitted", 2)
                with pytest.raises(NotEnoughSurvivorsError,
                                   match="'a' left after sending its masked update"):
                    await admin.aggregate()
                with pytest.raises(RoundAbandonedError):
                    await waiting
                assert sites["b"].send_record().signed_survivors is None  # bound to nobody
                async with sites["a"].session() as s:
                    assert s.resend_round == 1  # told once, on its next hello
                    sites["a"].note_abandoned(s.resend_round)
                async with sites["a"].session() as s:
                    assert s.resend_round is None
                again = [asyncio.create_task(sites[n].send_update(
                    await sites[n].session().connect(), ups[n], 10, 0)) for n in "ab"]
                await _wait(admin, "submitted", 2)
                assert (await admin.aggregate()).version == 1
            outcomes = await asyncio.gather(*again)
            assert {o.version for o in outcomes} == {1}
            await stays.close()
            return v0, await _published(fed, srv.port, "b")

    v0, v1 = asyncio.run(scenario())
    parts = [(ups[n], 10) for n in "ab"]
    expected, _ = fedavgm_step(v0, weighted_mean(parts), None)
    assert_published(v1, expected, tolerance(parts), v0)


def test_policy_caps_the_rounds_one_update_may_go_into(fed: Federation) -> None:
    """Each round an update's masked input goes into is one more sum that contains it; a
    server that keeps announcing failed rounds collects them.  [policy] max_attempts caps
    it: past the cap the hospital stops before its masked input leaves, and a new send
    past it stops before joining (it would only hold up the others' round)."""


    ups = {n: _update(30 + i) for i, n in enumerate("abc")}

    async def scenario() -> None:
        async with running(fed.server_settings()) as srv:
            strict = Hospital(fed.client_settings(
                "a", srv.port, ml=None,
                policy=config.HospitalPolicy(allow_unmasked=True, max_attempts=1)), None)
            sites = {"a": strict, **{n: _site(fed, n, srv.port) for n in "bc"}}
            for site in sites.values():
                await _get(site)

            async def send_all() -> dict[str, asyncio.Task]:
                return {n: asyncio.create_task(sites[n].send_update(
                    await sites[n].session().connect(), ups[n], 10, 0)) for n in "abc"}

            first = await send_all()
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait(admin, "submitted", 3)
                await admin.abort_round()  # announced: the hospitals may send again
                for task in first.values():
                    with pytest.raises(RoundAbandonedError):
                        await task
                second = await send_all()
                with pytest.raises(UpdateAlreadySentError, match="max_attempts"):
                    await second["a"]
                await _wait(admin, "joined", 2)
                assert "a" not in (await admin.status()).joined
                for n in "bc":
                    second[n].cancel()

    asyncio.run(scenario())


def test_after_a_round_fails_with_its_list_out_only_the_listed_hospitals_go_on(
        fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    """a and b are in round 1 (c = 0, t = 2); a vanishes after signing the list {a, b}, so
    only b answers the unmask step and nothing is published.  The server then admits only
    a and b to rounds on version 0: c is told to wait, the admin cannot close enrolment
    without a, and once a is back the two publish version 1 — their own sum, the same one
    round 1 could have revealed.  Then c sends on version 1."""
    ups = {n: _update(40 + i) for i, n in enumerate("abc")}

    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        settings = _no_colluder(fed)
        settings = settings.model_copy(update={"round": settings.round.model_copy(
            update={"enrolment_timeout": 3600.0, "step_timeout": 5.0})})
        async with running(settings) as srv:
            sites = {n: _site(fed, n, srv.port, colluders=0) for n in "abc"}
            v0 = await _get(sites["a"])
            for n in "bc":
                await _get(sites[n])
            gone = await sites["a"].session().connect()
            stays = await sites["b"].session().connect()
            left = asyncio.create_task(sites["a"].send_update(gone, ups["a"], 10, 0,
                                                              leave_after="signed"))
            waiting = asyncio.create_task(sites["b"].send_update(stays, ups["b"], 10, 0))
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                while len((await admin.status()).joined) < 2:
                    await asyncio.sleep(0.02)
                await admin.close_enrolment()
                await _wait(admin, "submitted", 2)
                aggregating = asyncio.create_task(admin.aggregate())
                assert await left is None  # a signed the list, then vanished
                await gone.close()
                with pytest.raises(NotEnoughSurvivorsError,
                                   match=r"a, b are on its survivor list.*exactly them"):
                    await aggregating
                with pytest.raises(RoundAbandonedError) as told:
                    await waiting
                assert told.value.retry_round == 0  # a is away: no retry without it
                assert "may combine only a, b: run send again" in told.value.message
                assert (await admin.status()).waiting_for == ("a", "b")
                # The operator's `admin status` says whom to ask, and how to go on if
                # their send refuses (found untested by a walk).
                capsys.readouterr()
                assert await _admin_status(fed, srv.port) == 0
                said = capsys.readouterr().err
                assert said.startswith("waiting for a, b: a round on version 0 failed after "
                                       "its survivor list went out, so the next may combine "
                                       "only the hospitals on it; ask them to connect and send")
                assert "raise [policy] max_attempts by one in hospital.toml" in said
                # And b's own `status` says that b is the one to act, not only "waiting
                # for a, b" with its own name in it (found by a walk).
                kit = read_toml(fed.certs.kit("b") / "hospital.toml")
                kit.update(host="127.0.0.1", port=srv.port)
                kit.pop("ml", None)
                b_toml = write_toml(fed.certs.kit("b") / "hospital-here.toml", kit)
                assert await asyncio.to_thread(
                    main, ["client", "--config", str(b_toml), "status"]) == 0
                line = capsys.readouterr().out
                assert ("; waiting for this hospital and a: the next round on this version "
                        "may combine only its survivor list, which names this hospital: run "
                        "send") in line, line
                assert sites["b"].check_can_send(0).survivors == {"a", "b"}
                # c was not on the list: rounds on version 0 are a's and b's now.
                async with sites["c"].session() as s:
                    with pytest.raises(ProtocolError, match="may combine only a, b"):
                        await sites["c"].send_update(s, ups["c"], 10, 0)
                again_b = asyncio.create_task(sites["b"].send_update(
                    await sites["b"].session().connect(), ups["b"], 10, 0))
                while not (await admin.status()).joined:
                    await asyncio.sleep(0.02)
                with pytest.raises(ProtocolError, match="still missing: a"):
                    await admin.close_enrolment()
                with pytest.raises(ProtocolError, match=r"exactly a, b .*still missing: a"):
                    await admin.aggregate()
                assert (await admin.status()).waiting_for == ("a",)
                async with sites["a"].session() as s:  # a is back, and told round 1 failed
                    assert s.resend_round == 1
                    sites["a"].note_abandoned(s.resend_round)
                assert sites["a"].check_can_send(0).survivors == {"a", "b"}
                again_a = asyncio.create_task(sites["a"].send_update(
                    await sites["a"].session().connect(), ups["a"], 10, 0))
                await _wait(admin, "submitted", 2)
                assert (await admin.aggregate()).version == 1
                assert {o.version for o in await asyncio.gather(again_a, again_b)} == {1}
                events = [e.event for e in await admin.audit(200)]
                assert "round-bound" in events
            await stays.close()
            v1 = await _published(fed, srv.port, "c")
            await _get(sites["c"])
            async with sites["c"].session() as s:  # the next version is open to everyone
                sent = asyncio.create_task(sites["c"].send_update(s, ups["c"], 10, 1))
                async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                    while not (await admin.status()).joined:
                        await asyncio.sleep(0.02)
                    assert (await admin.status()).joined == ("c",)
                sent.cancel()
            return v0, v1

    v0, v1 = asyncio.run(scenario())
    parts = [(ups[n], 10) for n in "ab"]
    expected, _ = fedavgm_step(v0, weighted_mean(parts), None)
    assert_published(v1, expected, tolerance(parts), v0)


def test_a_round_that_lost_a_sender_is_ended_without_binding_anyone(
        fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    """Walking it: with t = 3 of 3, 'a' left after its masked input went in; `admin status`
    still showed a round collecting, and `aggregate` sent out a survivor list naming 'a',
    which could not sign it: the round failed and bound every later round on version 0 to
    exactly a, b and c, with 'a' unable to rejoin.  Now the server says at once that the
    round cannot finish, `aggregate` ends it before any list goes out, and all three send
    again into a round that publishes their mean."""
    ups = {n: _update(20 + i) for i, n in enumerate("abc")}
    samples = {"a": 10, "b": 20, "c": 30}

    async def scenario() -> tuple[np.ndarray, np.ndarray, list[dict]]:
        async with running(fed.server_settings()) as srv:
            sites = {n: _site(fed, n, srv.port) for n in "abc"}
            v0 = await _get(sites["a"])
            for n in "bc":
                await _get(sites[n])
            sessions = {n: await sites[n].session().connect() for n in "abc"}
            tasks = {n: asyncio.create_task(sites[n].send_update(
                sessions[n], ups[n], samples[n], 0,
                leave_after="masked_input" if n == "a" else None)) for n in "abc"}
            assert await tasks["a"] is None
            await sessions["a"].close()
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait(admin, "submitted", 3)
                for _ in range(500):
                    if "round-doomed" in [e.event for e in await admin.audit()]:
                        break
                    await asyncio.sleep(0.02)
                # `admin status` still reads "collecting": it now says the round is lost.
                capsys.readouterr()
                assert await _admin_status(fed, srv.port) == 0
                note = capsys.readouterr().err
                assert note.startswith("note: round 1 cannot finish: 'a' left after sending "
                                       "its masked update"), note
                with pytest.raises(NotEnoughSurvivorsError) as err:
                    await admin.aggregate()
                said = err.value.message
                assert ("'a' left after sending its masked update, and the survivor list "
                        "needs 3 signatures while only 2 of the round's hospitals (b, c) are "
                        "still connected") in said, said
                assert "nothing was published" in said and "only into a round of" not in said
                # No retry of two when enrolment needs three (colluders + 2): it used to open,
                # be abandoned the same second, and fail b's and c's sends a second time.
                assert "too few hospitals are online to retry" in said, said
                for n in "bc":
                    with pytest.raises(RoundAbandonedError):
                        await tasks[n]
                    await sessions[n].close()
                # Everyone sends again, 'a' included: nobody is bound to round 1's list.
                async with contextlib.AsyncExitStack() as stack:
                    again = {n: await stack.enter_async_context(sites[n].session())
                             for n in "abc"}
                    assert again["a"].resend_round == 1  # told when it came back
                    sites["a"].note_abandoned(1)  # as the CLI and the app do on connecting
                    sends = [asyncio.create_task(sites[n].send_update(
                        again[n], ups[n], samples[n], 0)) for n in "abc"]
                    await _wait(admin, "submitted", 3)
                    assert (await admin.aggregate()).contributors == 3
                    await asyncio.gather(*sends)
                events = [{"event": e.event, "detail": e.detail} for e in await admin.audit(
                    limit=200)]
            return v0, await _published(fed, srv.port), events

    v0, v1, events = asyncio.run(scenario())
    kinds = [e["event"] for e in events]
    assert "round-doomed" in kinds and "round-bound" not in kinds, kinds
    assert "round-retry" not in kinds, kinds
    parts = [(ups[n], samples[n]) for n in "abc"]
    expected, _ = fedavgm_step(v0, weighted_mean(parts), None)
    assert_published(v1, expected, tolerance(parts), v0)


def test_stopping_the_server_mid_round_blames_no_hospital(
        fed: Federation, caplog: pytest.LogCaptureFixture) -> None:
    """Walking it (helper): Ctrl-C on the server with every masked update in logged
    "round 1 cannot finish: 'a' left after sending its masked update ... `securefl admin
    abort` or `aggregate` ends it": a hospital blamed, and advice for a server going away."""
    import json
    import logging

    ups = {n: _update(40 + i) for i, n in enumerate("abc")}

    async def scenario() -> list:
        async with running(fed.server_settings()) as srv:
            sites = {n: _site(fed, n, srv.port) for n in "abc"}
            for n in "abc":
                await _get(sites[n])
            sessions = {n: await sites[n].session().connect() for n in "abc"}
            tasks = [asyncio.create_task(sites[n].send_update(sessions[n], ups[n], 10, 0))
                     for n in "abc"]
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait(admin, "submitted", 3)
        # the server is closed here, with the round in flight
        return await asyncio.gather(*tasks, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="securefl"):
        outcomes = asyncio.run(scenario())
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
    # Each hospital is told what became of its update (a walk got "if an update was being
    # sent, send it again", from a send that knew its masked update had gone in).
    for o in outcomes:
        assert isinstance(o, TransportError), o
        assert str(o).startswith("the server closed the connection after this hospital's "
                                 "masked update went into round 1, before the round "
                                 "published: nothing is lost"), o
    assert not any("cannot finish" in r.getMessage() for r in caplog.records), caplog.text
    events = [json.loads(line)["event"] for line in
              (fed.certs.root / "audit.jsonl").read_text().splitlines()]
    assert "round-doomed" not in events and "submission" in events


def test_a_server_that_stops_before_the_update_went_in_says_nothing_was_used(
        fed: Federation) -> None:
    async def scenario() -> list:
        async with running(fed.server_settings()) as srv:
            sites = {n: _site(fed, n, srv.port) for n in "ab"}
            for n in "ab":
                await _get(sites[n])
            sessions = {n: await sites[n].session().connect() for n in "ab"}
            tasks = [asyncio.create_task(sites[n].send_update(sessions[n], _update(i), 10, 0))
                     for i, n in enumerate("ab")]
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait(admin, "joined", 2)  # the third never comes: still enrolling
        return await asyncio.gather(*tasks, return_exceptions=True)

    for o in asyncio.run(scenario()):
        assert isinstance(o, TransportError), o
        assert str(o) == ("the server closed the connection before this hospital's update "
                          "went into a round: nothing of it was used; once the server is "
                          "back, run send again"), o
