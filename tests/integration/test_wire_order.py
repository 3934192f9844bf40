"""The wire order (``securefl.protocol.conversation``) at work over real TLS: the real server
refuses a hospital's steps out of order by its table, naming the step and the phase, and a
real hospital session skips what the server still sends for a round it left."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from securefl import config
from securefl.certs import load_credential
from securefl.client.session import AdminSession, HospitalSession
from securefl.crypto import pki
from securefl.crypto.secagg import ClientRound
from securefl.protocol import mapping

from .conftest import Federation, running
from .test_bad_input import Raw

D = 1000


def _updates(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.normal(0, 0.05, D).astype(np.float32) for _ in range(n)]


async def _count(admin: AdminSession, n: int) -> None:
    while await admin.count() < n:
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("header", "payload", "code"), [
    ({"kind": "masked_input", "array": {"dtype": "<u4", "shape": [D + 1]}},
     bytes(4 * (D + 1)), "remote-protocol"),
    ({"kind": "upload_slot", "nbytes": 4 * (D + 1)}, b"", "wrong-phase"),
    ({"kind": "sign_survivors", "signature": "AAAA"}, b"", "remote-protocol"),
    ({"kind": "unmask_response", "b_shares": {}, "s_shares": {}}, b"", "remote-protocol"),
])
def test_steps_out_of_order_are_refused_by_the_table_naming_the_phase(
        fed: Federation, header: dict, payload: bytes, code: str) -> None:
    """A hospital that advertised its keys and skips ahead (a masked input before any
    envelope, a signature before any survivor list) is refused with the code of PROTOCOL.md
    section 6, in a sentence that names the step and where its connection is."""
    async def scenario() -> None:
        async with running(fed.server_settings()) as srv:
            raw = await Raw.open(fed, "a", srv.port)
            model = await raw.request({"kind": "get_global", "rid": 1})
            joined = await raw.request({"kind": "join", "rid": 2, "base_version": 0})
            rid = joined["round_id"]
            s = fed.client_settings("a", srv.port)
            cred = load_credential(s.cert, s.key)
            rnd = ClientRound(cert=cred.cert, signing_key=cred.key,
                              ca_cert=pki.load_cert(s.ca.read_bytes()), round_id=rid,
                              base_version=0, update=_updates(1)[0], weight=5,
                              base_sha256=bytes.fromhex(model["sha256"]))
            advert = mapping.advertisement_to_wire(rnd.advertise(), rid=3)
            ack = await raw.request(advert.model_dump_json().encode())
            assert ack["kind"] == "ack", ack
            reply = await raw.request({**header, "rid": 4, "round_id": rid}, payload)
            assert reply["kind"] == "error" and reply["code"] == code, reply
            assert reply["message"] == (
                f"'{header['kind']}' is not allowed while this hospital has advertised its "
                f"keys for round {rid} and waits for the roster")
            again = await raw.request({"kind": "join", "rid": 5, "base_version": 0})
            assert again["code"] == "already-joined", again
            status = await raw.request({"kind": "status", "rid": 6})
            assert status["phase"] == "enrolling" and status["joined"] == ["a"]
            assert status["submitted"] == []
            raw.close()

    asyncio.run(scenario())


def test_a_hospital_that_left_a_round_sends_its_next_update_on_the_same_connection(
        fed: Federation) -> None:
    """'a' stops after its masked input and stays connected; the server, which cannot know,
    sends it round 1's survivor list and end.  Its next send on that connection skips them
    (they are for a round it left) and takes part in round 2."""
    settings = fed.server_settings(hospitals=["a", "b", "c", "d"],
                                   round=config.RoundSettings(step_timeout=0.5))
    names = "abcd"

    async def scenario() -> tuple[int, int]:
        async with running(settings) as srv:
            sessions = {n: await HospitalSession(fed.client_settings(n, srv.port)).connect()
                        for n in names}
            try:
                for s in sessions.values():
                    await s.get_global()
                first, second = _updates(4), _updates(8)[4:]
                others = [asyncio.create_task(sessions[n].send(first[i], 10))
                          for i, n in enumerate(names) if n != "a"]
                assert await sessions["a"].send(first[0], 10, leave_after="masked_input") \
                    is None
                async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                    await _count(admin, 4)
                    assert (await admin.aggregate()).contributors == 4
                    assert [o.version for o in await asyncio.gather(*others)] == [1, 1, 1]
                    for s in sessions.values():
                        assert (await s.get_global()).version == 1
                    sends = [asyncio.create_task(sessions[n].send(second[i], 10))
                             for i, n in enumerate(names)]
                    await asyncio.wait_for(_count(admin, 4), 30)
                    published = (await admin.aggregate()).version
                    outcomes = await asyncio.wait_for(asyncio.gather(*sends), 30)
                return published, outcomes[0].version
            finally:
                for s in sessions.values():
                    await s.close()

    published, a_saw = asyncio.run(scenario())
    assert published == a_saw == 2
