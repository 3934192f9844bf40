"""Whole rounds over real mutual TLS on loopback: the arithmetic, dropouts and stale bases."""

from __future__ import annotations

import asyncio
import contextlib
import os

import numpy as np
import pytest

from securefl import config
from securefl.cli import EXIT_CODES
from securefl.client.session import AdminSession, HospitalSession
from securefl.crypto import shamir
from securefl.errors import (
    CryptoError,
    DataError,
    NotEnoughSurvivorsError,
    ProtocolError,
    SecureFLError,
    StaleVersionError,
)
from securefl.protocol import messages as wm
from securefl.server.app import BIG_PAYLOAD
from securefl.server.audit import read_entries
from securefl.server.store import ModelStore

from .conftest import Federation, forged_admin, running

D = 1000


def _updates(n: int, d: int = D) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.normal(0, 0.05, d).astype(np.float32) for _ in range(n)]


async def _wait_count(admin: AdminSession, n: int) -> None:
    while await admin.count() < n:
        await asyncio.sleep(0.02)


async def _round(fed: Federation, settings: config.ServerSettings, samples: list[int],
                 leave: dict[str, str] | None = None) -> tuple[list, object, object]:
    """Every registered hospital sends; ``leave`` makes some vanish after a step."""
    leave = leave or {}
    names = settings.hospitals
    ups = _updates(len(names), settings.model.params or D)
    async with running(settings) as srv:
        port = srv.port

        async def hospital(i: int, name: str) -> object:
            async with HospitalSession(fed.client_settings(name, port)) as h:
                await h.get_global()
                steps: list[str] = []
                out = await h.send(ups[i], samples[i], leave_after=leave.get(name),  # type: ignore[arg-type]
                                   on_step=lambda s: steps.append(s.name))
                if out is not None:  # a hospital that stayed saw every step, in order
                    if "retrying" in steps:  # of the round that published
                        steps = steps[len(steps) - steps[::-1].index("retrying"):]
                    assert steps == (["joined", "masked-sent", "published"]
                                     if settings.round.masking == "plain" else
                                     ["joined", "roster", "keys-shared", "masked-sent", "signed",
                                      "unmasked", "published"])
                return out

        tasks = [asyncio.create_task(hospital(i, n)) for i, n in enumerate(names)]
        try:
            async with AdminSession(fed.client_settings("admin", port)) as admin:
                expected = len(names) - sum(1 for v in leave.values() if v != "masked_input")
                await _wait_count(admin, expected)
                result = await admin.aggregate()
        finally:
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes, result, ups


@pytest.mark.parametrize("masking", ["secagg", "plain"])
def test_three_hospitals_give_the_weighted_mean(fed: Federation, masking: str) -> None:
    settings = fed.server_settings(round=config.RoundSettings(masking=masking))
    samples = [10, 30, 60]
    outcomes, result, ups = asyncio.run(_round(fed, settings, samples))
    assert result.version == 1 and result.contributors == 3 and result.total_samples == 100
    assert all(o.version == 1 and o.sha256 == result.sha256 for o in outcomes)
    store = ModelStore(settings.store_dir)
    (_, w0), (info, w1) = store.read(0), store.read(1)
    expected = sum(u * n for u, n in zip(ups, samples, strict=True)) / sum(samples)
    np.testing.assert_allclose(w1 - w0, expected, atol=1e-3)
    assert info.contributors == 3 and info.total_samples == 100


def test_model_sized_uploads_take_turns_for_the_slot_and_give_the_weighted_mean(
    fed: Federation,
) -> None:
    """Above ``BIG_PAYLOAD`` each masked input waits for the server's upload slot (protocol
    2's ``upload_slot``); the arithmetic must not notice."""
    params = BIG_PAYLOAD // 4 + 50_000
    settings = fed.server_settings(model=config.ModelSettings(params=params))
    samples = [5, 10, 20]
    outcomes, result, ups = asyncio.run(_round(fed, settings, samples))
    assert result.contributors == 3 and all(o.version == 1 for o in outcomes)
    store = ModelStore(settings.store_dir)
    expected = sum(u * n for u, n in zip(ups, samples, strict=True)) / sum(samples)
    np.testing.assert_allclose(store.read(1)[1] - store.read(0)[1], expected, atol=1e-3)


@pytest.mark.parametrize(("leaver", "when", "counted"), [
    # gone before confirming the roster: the graph cannot be drawn without it, so the
    # round is retried at once with the others
    ("a", "join", [1, 2, 3]),
    ("a", "share_keys", [1, 2, 3]),    # gone before its masked input: left out, mask removed
    ("d", "masked_input", [0, 1, 2, 3]),  # gone after it: still in, others unmask for it
])
def test_a_hospital_dropping_out(fed: Federation, leaver: str, when: str,
                                 counted: list[int]) -> None:
    """Four hospitals, so that a dropout still leaves more than t answers."""
    settings = fed.server_settings(hospitals=["a", "b", "c", "d"],
                                   round=config.RoundSettings(step_timeout=10))
    samples = [10, 20, 30, 40]
    outcomes, result, ups = asyncio.run(_round(fed, settings, samples, leave={leaver: when}))
    gone = "abcd".index(leaver)
    assert outcomes[gone] is None
    assert all(o.version == 1 for i, o in enumerate(outcomes) if i != gone)
    assert result.contributors == len(counted)
    assert result.total_samples == sum(samples[i] for i in counted)
    store = ModelStore(settings.store_dir)
    expected = sum(ups[i] * samples[i] for i in counted) / sum(samples[i] for i in counted)
    np.testing.assert_allclose(store.read(1)[1] - store.read(0)[1], expected, atol=1e-3)


def test_too_few_online_to_unmask(fed: Federation) -> None:
    """Two of three leave after their masked input: one answer is below t = 2."""
    settings = fed.server_settings(round=config.RoundSettings(step_timeout=5))
    with pytest.raises(NotEnoughSurvivorsError):
        asyncio.run(_round(fed, settings, [1, 2, 3],
                           leave={"a": "masked_input", "c": "masked_input"}))
    assert ModelStore(settings.store_dir).versions() == [0]


def test_stale_base_version_is_refused_with_the_current_version(fed: Federation) -> None:
    settings = fed.server_settings(round=config.RoundSettings(masking="plain"))
    asyncio.run(_round(fed, settings, [1, 1, 1]))  # publishes version 1

    async def stale() -> None:
        async with running(settings) as srv, HospitalSession(
            fed.client_settings("a", srv.port)) as h:
            with pytest.raises(StaleVersionError) as err:
                await h.send(np.full(D, 0.01, np.float32), 5, base_version=0)
            assert err.value.server_version == 1  # type: ignore[attr-defined]
            assert "current version is 1" in err.value.message
            # The same hospital can go on: download the new model and join.
            assert (await h.get_global()).version == 1

    asyncio.run(stale())


def test_too_few_updates_to_aggregate(fed: Federation) -> None:
    settings = fed.server_settings(round=config.RoundSettings(masking="plain"))

    async def scenario() -> None:
        async with running(settings) as srv:
            async with HospitalSession(fed.client_settings("a", srv.port)) as h:
                await h.get_global()
                await h.send(_updates(1)[0], 5, leave_after="masked_input")
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                with pytest.raises(NotEnoughSurvivorsError):
                    await admin.aggregate()
                assert await admin.version() == 0

    asyncio.run(scenario())


def test_aggregate_while_enrolling_says_close_ends_enrolment(fed: Federation) -> None:
    """The walk's admin ran ``aggregate`` while hospitals were still joining and was told
    only "the round is enrolling": the refusal now names the command that moves on."""
    async def scenario() -> None:
        async with running(fed.server_settings()) as srv:
            async with HospitalSession(fed.client_settings("a", srv.port)) as h:
                await h.get_global()
                with contextlib.suppress(SecureFLError):
                    await h.send(_updates(1)[0], 5, leave_after="join")
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                with pytest.raises(ProtocolError) as refused:
                    await admin.aggregate()
                assert refused.value.code == "round-not-ready"
                assert refused.value.message.endswith(
                    "the round is enrolling; aggregate once updates are being collected; "
                    "`close` ends enrolment with the hospitals that joined (or wait for the "
                    "others)")
                assert await admin.version() == 0

    asyncio.run(scenario())


def test_nan_update_never_leaves_the_hospital(fed: Federation) -> None:
    async def scenario() -> None:
        async with running(fed.server_settings()) as srv, HospitalSession(
            fed.client_settings("a", srv.port)) as h:
            await h.get_global()
            bad = np.zeros(D, np.float32)
            bad[3] = np.nan
            with pytest.raises(DataError):
                await h.send(bad, 5)
            bad[3] = np.inf
            with pytest.raises(DataError):
                await h.send(bad, 5)
            with pytest.raises(DataError):
                await h.send(np.zeros(D + 1, np.float32), 5)
            assert (await h.status()).submitted == ()

    asyncio.run(scenario())


def test_hospital_certificate_cannot_act_as_admin(fed: Federation) -> None:
    async def scenario() -> None:
        async with running(fed.server_settings()) as srv:
            async with forged_admin(fed.client_settings("a", srv.port)) as fake:
                for action in (fake.aggregate, fake.version, fake.abort_round):
                    with pytest.raises(ProtocolError) as err:
                        await action()
                    assert err.value.code == "forbidden"
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                assert await admin.version() == 0

    asyncio.run(scenario())


def test_admin_abort_tells_members_to_resend(fed: Federation) -> None:
    settings = fed.server_settings(round=config.RoundSettings(masking="plain"))

    async def scenario() -> None:
        async with running(settings) as srv, HospitalSession(
            fed.client_settings("a", srv.port)) as h:
            await h.get_global()
            task = asyncio.create_task(h.send(_updates(1)[0], 5))
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait_count(admin, 1)
                st = await admin.status()
                assert st.online == ("a",) and st.submitted == ("a",)
                await admin.abort_round()
            with pytest.raises(ProtocolError) as err:
                await task
            assert err.value.code == "round-aborted"

    asyncio.run(scenario())


async def _two_of_three(fed: Federation, settings: config.ServerSettings,
                        close_by_admin: bool) -> list:
    """Two of three hospitals: a federation that assumes no colluder (c = 0 on both sides;
    with the default c = 1 a round needs three)."""
    ups = _updates(2)
    no_colluder = config.HospitalPolicy(allow_unmasked=True, colluders=0)
    async with running(settings) as srv:
        sessions = [await HospitalSession(fed.client_settings(n, srv.port,
                                                              policy=no_colluder)).connect()
                    for n in "ab"]
        for s in sessions:
            await s.get_global()
        tasks = [asyncio.create_task(s.send(u, 10)) for s, u in zip(sessions, ups, strict=True)]
        async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
            while len((await admin.status()).joined) < 2:
                await asyncio.sleep(0.02)
            if close_by_admin:
                await admin.close_enrolment()
            await _wait_count(admin, 2)
            result = await admin.aggregate()
            assert result.contributors == 2
        outcomes = await asyncio.gather(*tasks)
        for s in sessions:
            await s.close()
    return outcomes


def test_enrolment_closes_at_the_deadline_with_min_clients(fed: Federation) -> None:
    """'c' never comes: after the deadline the two that joined are enough."""
    settings = fed.server_settings(round=config.RoundSettings(enrolment_timeout=0.3,
                                                              colluders=0))
    outcomes = asyncio.run(_two_of_three(fed, settings, close_by_admin=False))
    assert [o.version for o in outcomes] == [1, 1]


def test_admin_closes_enrolment(fed: Federation) -> None:
    settings = fed.server_settings(round=config.RoundSettings(enrolment_timeout=3600,
                                                              colluders=0))
    outcomes = asyncio.run(_two_of_three(fed, settings, close_by_admin=True))
    assert [o.version for o in outcomes] == [1, 1]


def test_connection_cap_refuses_extra_connections_only(fed: Federation) -> None:
    from securefl.errors import TransportError

    settings = fed.server_settings(limits=config.Limits(
        max_connections=2, reserved_connections=0, max_connections_per_identity=2))

    async def scenario() -> None:
        async with running(settings) as srv:
            first = await HospitalSession(fed.client_settings("a", srv.port)).connect()
            second = await AdminSession(fed.client_settings("admin", srv.port)).connect()
            with pytest.raises(TransportError):
                await HospitalSession(fed.client_settings("b", srv.port)).connect()
            assert (await first.status()).online == ("a",)
            assert await second.version() == 0
            await first.close()
            await second.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("silent_after", ["join", "masked_input"])
def test_a_connected_but_silent_hospital_is_dropped_at_the_step_deadline(
    fed: Federation, silent_after: str
) -> None:
    """'d' stays connected but stops answering: the round goes on without it after
    step_timeout (its masked input, if it sent one, still counts).  Silent from the roster
    on, it never confirms it, so the graph cannot be drawn: the round restarts at once
    without it, and the others follow the retry on their own."""
    settings = fed.server_settings(hospitals=["a", "b", "c", "d"],
                                   round=config.RoundSettings(step_timeout=0.5))
    ups = _updates(4)

    async def scenario() -> None:
        async with running(settings) as srv:
            silent = await HospitalSession(fed.client_settings("d", srv.port)).connect()
            await silent.get_global()
            others = [await HospitalSession(fed.client_settings(n, srv.port)).connect()
                      for n in "abc"]
            for s in others:
                await s.get_global()
            tasks = [asyncio.create_task(s.send(u, 10)) for s, u in zip(others, ups, strict=False)]
            await silent.send(ups[3], 10, leave_after=silent_after)  # type: ignore[arg-type]
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait_count(admin, 4 if silent_after == "masked_input" else 3)
                result = await admin.aggregate()
            assert result.contributors == (4 if silent_after == "masked_input" else 3)
            assert [o.version for o in await asyncio.gather(*tasks)] == [1, 1, 1]
            for s in [*others, silent]:
                await s.close()

    asyncio.run(scenario())


def test_download_reports_its_progress(fed: Federation) -> None:
    """``get_global(on_progress)`` hears the bytes as they arrive, up to the whole model."""
    settings = fed.server_settings(model=config.ModelSettings(params=600_000))

    async def scenario() -> list[tuple[int, int]]:
        seen: list[tuple[int, int]] = []
        async with running(settings) as srv, HospitalSession(
                fed.client_settings("a", srv.port)) as h:
            model = await h.get_global(on_progress=lambda got, total: seen.append((got, total)))
            assert model.weights.nbytes == 2_400_000
            assert h.conn.payload_progress is None  # only during that download
        return seen

    seen = asyncio.run(scenario())
    assert len(seen) > 2 and all(total == 2_400_000 for _, total in seen)
    got = [g for g, _ in seen]
    assert got == sorted(got) and got[-1] == 2_400_000


def test_a_server_cannot_make_a_hospital_send_in_the_clear(fed: Federation) -> None:
    """Attack 3 of the secure-aggregation review: a server configured (or lying) with
    masking = "plain" asks for the update unmasked.  A hospital with the default policy
    refuses before anything leaves; only one whose own settings allow it (a test
    federation, the benchmark) sends in the clear."""
    settings = fed.server_settings(round=config.RoundSettings(masking="plain"))

    async def scenario() -> None:
        async with running(settings) as srv:
            strict = fed.client_settings("a", srv.port, policy=config.HospitalPolicy())
            async with HospitalSession(strict) as h:
                await h.get_global()
                with pytest.raises(CryptoError, match=r"without masks.*nothing was sent"):
                    await h.send(np.full(D, 0.01, np.float32), 5)
                assert (await h.status()).submitted == ()
            allowing = fed.client_settings("b", srv.port)  # allow_unmasked = true
            async with HospitalSession(allowing) as h:
                await h.get_global()
                await h.send(np.full(D, 0.01, np.float32), 5, leave_after="masked_input")
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                assert (await admin.status()).submitted == ("b",)

    asyncio.run(scenario())


def _sending(fed: Federation, port: int, first: type[HospitalSession],
             ups: list[np.ndarray], samples: list[int]) -> list[asyncio.Task]:
    """Hospitals a, b, c each getting the model and sending, 'a' with session ``first``."""
    async def hospital(i: int, name: str) -> object:
        cls = first if name == "a" else HospitalSession
        async with cls(fed.client_settings(name, port)) as h:
            await h.get_global()
            return await h.send(ups[i], samples[i])

    return [asyncio.create_task(hospital(i, n)) for i, n in enumerate("abc")]


class _WrongShares(HospitalSession):
    """A hospital that answers its first unmask request with random shares (issue 14's
    high finding: the server published noise, or stayed 'failed' and refused every join)."""

    tampered = False

    async def _in_round(self, round_id: int, msg: wm._Wire,
                        array: np.ndarray | None = None) -> tuple[wm.Message, object]:
        if isinstance(msg, wm.UnmaskResponseMsg) and not _WrongShares.tampered:
            _WrongShares.tampered = True
            msg = msg.model_copy(update={"b_shares": {  # random, but in the field
                k: shamir.share_to_bytes(int.from_bytes(os.urandom(33), "big") % shamir.PRIME)
                for k in msg.b_shares}})
        return await super()._in_round(round_id, msg, array)


def test_wrong_unmask_shares_publish_nothing_and_the_retry_publishes_the_right_model(
        fed: Federation) -> None:
    settings = fed.server_settings(round=config.RoundSettings(step_timeout=10))
    ups, samples = _updates(3), [10, 20, 30]

    async def scenario() -> tuple[list[object], str, object]:
        async with running(settings) as srv:
            tasks = _sending(fed, srv.port, _WrongShares, ups, samples)
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait_count(admin, 3)
                with pytest.raises(NotEnoughSurvivorsError) as failed:
                    await admin.aggregate()
                await _wait_count(admin, 3)  # the hospitals followed the retry at once
                result = await admin.aggregate()
            return list(await asyncio.gather(*tasks)), failed.value.message, result

    _WrongShares.tampered = False
    outcomes, failed, result = asyncio.run(scenario())
    assert "'a' returned a share of" in failed and "nothing was published" in failed
    named = [e for e in read_entries(settings.audit_log) if e["event"] == "bad-shares"]
    assert [e["name"] for e in named] == ["a"]
    assert all(o.version == 1 for o in outcomes)  # type: ignore[attr-defined]
    store = ModelStore(settings.store_dir)
    assert store.versions() == [0, 1]
    expected = sum(u * n for u, n in zip(ups, samples, strict=True)) / sum(samples)
    np.testing.assert_allclose(store.read(1)[1] - store.read(0)[1], expected, atol=1e-3)
    assert result.contributors == 3  # type: ignore[attr-defined]


def test_values_beyond_the_clip_are_reported_by_the_hospital_not_clipped_silently(
        fed: Federation) -> None:
    """Issue 15: what a hospital sends beyond the round's clip goes into the sum clipped, and
    the hospital is told how many values that was (here 5 batch-norm-like values of 2.5)."""
    settings = fed.server_settings()
    names = settings.hospitals
    ups = _updates(len(names), settings.model.params or D)
    ups[0][:5] = 2.5
    said: dict[str, list[str]] = {n: [] for n in names}

    async def scenario() -> object:
        async with running(settings) as srv:
            async def hospital(i: int, name: str) -> object:
                async with HospitalSession(fed.client_settings(name, srv.port)) as h:
                    await h.get_global()
                    return await h.send(ups[i], 10, on_step=lambda s: said[name].append(
                        s.detail))

            tasks = [asyncio.create_task(hospital(i, n)) for i, n in enumerate(names)]
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait_count(admin, len(names))
                result = await admin.aggregate()
            await asyncio.gather(*tasks)
            return result

    asyncio.run(scenario())
    clip = settings.round.clip
    told = [d for d in said[names[0]] if "beyond the round's clip" in d]
    assert len(told) == 1 and f"5 of {ups[0].size} values" in told[0] \
        and f"clip of {clip:g}" in told[0] and "largest 2.5" in told[0], said[names[0]]
    assert "normal for a few values, nothing to do" in told[0]  # 5 values: under 1 %
    assert not any("beyond" in d for n in names[1:] for d in said[n])
    store = ModelStore(settings.store_dir)
    expected = sum(np.clip(u, -clip, clip) for u in ups) / len(ups)
    np.testing.assert_allclose(store.read(1)[1] - store.read(0)[1], expected, atol=1e-3)


class _NoUpdate(HospitalSession):
    """A hospital whose masked input is no encoded update (every ring element at the top of
    its range), as the adversary review sent."""

    async def _in_round(self, round_id: int, msg: wm._Wire,
                        array: np.ndarray | None = None) -> tuple[wm.Message, object]:
        if isinstance(msg, wm.MaskedInputMsg) and array is not None:
            array = np.full_like(array, np.iinfo(array.dtype).max // 2)
        return await super()._in_round(round_id, msg, array)


def test_an_input_that_is_no_update_names_the_set_and_is_a_crypto_failure(
        fed: Federation) -> None:
    """The admin was told "a hospital returned a wrong share" with exit 8 (too few
    hospitals) and "nothing was published" twice, though every share was honest (the
    adversary's re-check): it is a cryptographic check that failed (exit 5), and masking
    hides which of the listed hospitals sent it."""
    settings = fed.server_settings(round=config.RoundSettings(step_timeout=10))
    ups, samples = _updates(3), [10, 20, 30]

    async def scenario() -> str:
        async with running(settings) as srv:
            tasks = _sending(fed, srv.port, _NoUpdate, ups, samples)
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                await _wait_count(admin, 3)
                with pytest.raises(CryptoError) as failed:
                    await admin.aggregate()
                assert EXIT_CODES[type(failed.value)] == 5
                await admin.abort_round()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return failed.value.message

    said = asyncio.run(scenario())
    assert "one of a, b, c sent a masked input that is not an encoded update" in said, said
    assert "wrong share" not in said and said.count("nothing was published") == 1, said
