"""Pinned membership and the server certificate's revocation, over real mutual TLS.

The server here is the deviating party: it lets a hospital certificate the CA issued but
the operator never listed (or no longer lists) into a round, or it presents a certificate
the operator revoked.  The honest hospitals run the real ``HospitalSession`` with their
kits as ``securefl certs`` made them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.certs import load_credential
from securefl.client.session import AdminSession, HospitalSession
from securefl.client.transport import Connection
from securefl.crypto import pki
from securefl.crypto.membership import MemberList
from securefl.crypto.secagg import ClientRound
from securefl.errors import CertificateRejectedError, CryptoError
from securefl.protocol import mapping
from securefl.protocol import messages as wm

from .conftest import Federation, running

D = 1000


def _outsider(fed: Federation, how: str) -> tuple[str, Path]:
    """A hospital certificate the CA issued that the member list does not name (its kit
    folder, with hospital.pem/.key): minted and never added, or a renewed hospital's old one."""
    where = fed.tmp / "outsider"
    where.mkdir()
    if how == "minted":
        cred = pki.issue(fed.certs.ca(), pki.Role.HOSPITAL, "mallory")
        (where / "hospital.pem").write_bytes(cred.cert_pem())
        (where / "hospital.key").write_bytes(cred.key_pem())
        return "mallory", where
    kit = fed.certs.kit("c")
    for f in ("hospital.pem", "hospital.key"):
        shutil.copy(kit / f, where / f)
    fed.certs.renew("c")  # the old certificate stays CA-valid, but is off the list
    return "c", where


async def _join_as(settings: config.ClientSettings, update: np.ndarray) -> Connection:
    """The outsider, in the server's pay: joins and advertises round keys as the protocol
    says (with code of its own, not the hospital session, which would refuse itself)."""
    conn = await Connection.open(settings)
    model, _ = await conn.request(wm.GetGlobal())
    joined, _ = await conn.request(wm.Join(base_version=0))
    cred = load_credential(settings.cert, settings.key)
    rnd = ClientRound(cert=cred.cert, signing_key=cred.key,
                      ca_cert=pki.load_cert(settings.ca.read_bytes()),
                      round_id=joined.round_id, base_version=0, update=update, weight=50,
                      base_sha256=bytes.fromhex(model.sha256))
    await conn.request(mapping.advertisement_to_wire(rnd.advertise()))
    return conn


@pytest.mark.parametrize("how", ["minted", "renewed"])
def test_a_round_with_a_hospital_off_the_member_list_is_refused(fed: Federation,
                                                                how: str) -> None:
    name, folder = _outsider(fed, how)
    listed = MemberList.load(fed.certs.members.read_bytes(), fed.certs.ca().cert)
    assert name not in listed.members or how == "renewed"
    settings = fed.server_settings(hospitals=["a", "b", name],
                                   round=config.RoundSettings(min_clients=3, step_timeout=5.0))
    rng = np.random.default_rng(3)
    ups = [rng.normal(0, 0.05, D).astype(np.float32) for _ in range(3)]

    async def scenario() -> None:
        async with running(settings) as srv:
            outsider = fed.client_settings("a", srv.port).model_copy(update={
                "cert": folder / "hospital.pem", "key": folder / "hospital.key",
                "state_dir": folder / "state"})

            async def honest(i: int, who: str) -> object:
                async with HospitalSession(fed.client_settings(who, srv.port)) as h:
                    await h.get_global()
                    return await h.send(ups[i], 20 + i)

            tasks = [asyncio.create_task(honest(i, w)) for i, w in enumerate(["a", "b"])]
            conn = await _join_as(outsider, ups[2])
            try:
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                    assert await admin.count() == 0  # no masked input reached the server
            finally:
                await conn.close()
        expected = (f"the round names '{name}', who is not a member" if how == "minted" else
                    f"presents '{name}' with a certificate other than the one")
        for outcome in outcomes:
            assert isinstance(outcome, CryptoError), outcome
            assert expected in outcome.message and "nothing was sent" in outcome.message

    asyncio.run(scenario())


def test_hospitals_take_newer_member_lists_from_the_server_and_refuse_older(
        fed: Federation) -> None:
    ca = fed.certs.ca().cert
    kit_list = fed.certs.kit("a") / "members.json"
    old = fed.tmp / "old-members.json"
    shutil.copy(fed.certs.members, old)
    fed.certs.add_hospital("e")  # a newer list: number + 1, naming e
    shutil.copy(old, kit_list)  # a's machine still has the kit as it was first copied

    async def scenario() -> None:
        async with running(fed.server_settings()) as srv:
            settings = fed.client_settings("a", srv.port)
            async with HospitalSession(settings) as h:
                assert h.members is not None and "e" in h.members.members
            kept = MemberList.load((settings.state_dir / "members.json").read_bytes(), ca)
            assert kept.number > MemberList.load(old.read_bytes(), ca).number
            # The server's file goes back to the older list (one that does not name e).
            shutil.copy(old, fed.certs.members)
            with pytest.raises(CryptoError, match="older member list"):
                async with HospitalSession(settings):
                    pass

    asyncio.run(scenario())


def _old_server(fed: Federation, *, past: dt.datetime | None = None) -> Path:
    """Keep the server's certificate, then have the operator revoke it (`certs revoke
    server`, which also issues the next one); returns where the old one is."""
    keep = fed.tmp / "old-server"
    keep.mkdir()
    for f in ("server.pem", "server.key", "crl.pem"):
        shutil.copy(fed.certs.root / f, keep / f)
    fed.certs.revoke("server", now=past)
    return keep


def test_a_hospital_refuses_a_server_presenting_a_revoked_certificate(fed: Federation) -> None:
    old = _old_server(fed)
    stale_kit = fed.certs.kit("b") / "crl.pem"
    shutil.copy(old / "crl.pem", stale_kit)  # b never got the new kit's list

    async def scenario() -> None:
        # A server still presenting the revoked certificate (and handing out the old list).
        async with running(fed.server_settings(cert=old / "server.pem", key=old / "server.key",
                                               crl=old / "crl.pem")) as srv:
            with pytest.raises(CertificateRejectedError,
                               match=r"presented a server certificate that the federation "
                               r"operator revoked.*will not talk to it"):
                async with HospitalSession(fed.client_settings("a", srv.port)):
                    pass
            assert not (fed.client_settings("a", srv.port).state_dir / "crl.der").exists()
        # The same certificate with the current list: b learns of the revocation from the
        # welcome itself, and stops there.
        async with running(fed.server_settings(cert=old / "server.pem",
                                               key=old / "server.key")) as srv:
            with pytest.raises(CertificateRejectedError, match="operator revoked"):
                async with HospitalSession(fed.client_settings("b", srv.port)):
                    pass
        # The server with its new certificate: business as usual.
        async with running(fed.server_settings()) as srv, HospitalSession(
                fed.client_settings("a", srv.port)) as h:
            assert (await h.get_global()).version == 0

    asyncio.run(scenario())


def test_an_expired_revocation_list_warns_but_never_locks_the_hospital_out(
        fed: Federation) -> None:
    """Revoked stays revoked on an expired list; otherwise the hospital connects, is told
    the list is past its renewal, and gets the newer one in the same connection."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=31)
    old = _old_server(fed, past=past)  # the operator's list from then: expired now
    kit_crl = fed.certs.kit("a") / "crl.pem"
    expired = pki.load_crl(kit_crl.read_bytes(), fed.certs.ca().cert)
    assert expired.next_update_utc < dt.datetime.now(dt.UTC)
    held_expired = fed.tmp / "expired-crl.pem"
    shutil.copy(kit_crl, held_expired)
    fed.certs.renew()  # a fresh server certificate and list, which the server hands out
    shutil.copy(held_expired, kit_crl)  # but the hospital has only the expired one

    async def scenario() -> None:
        async with running(fed.server_settings(cert=old / "server.pem", key=old / "server.key")
                           ) as srv:
            with pytest.raises(CertificateRejectedError, match="operator revoked"):
                async with HospitalSession(fed.client_settings("a", srv.port)):
                    pass
        async with running(fed.server_settings()) as srv:
            settings = fed.client_settings("a", srv.port)
            async with HospitalSession(settings) as h:
                assert any("was due for renewal" in w and "checked anyway" in w
                           for w in h.conn.warnings), h.conn.warnings
                assert (await h.get_global()).version == 0
            kept = pki.load_crl((settings.state_dir / "crl.der").read_bytes(),
                                fed.certs.ca().cert)
            assert kept.next_update_utc > dt.datetime.now(dt.UTC)
            async with HospitalSession(settings) as h:  # the next connection: no warning
                assert h.conn.warnings == []

    asyncio.run(scenario())


def test_the_server_will_not_start_on_a_member_list_the_ca_did_not_sign(
        fed: Federation) -> None:
    from securefl.errors import ConfigError

    text = fed.certs.members.read_text().replace('"number": ', '"number": 1', 1)
    fed.certs.members.write_text(text)  # a raised number: no longer what the CA signed

    async def scenario() -> None:
        with pytest.raises(ConfigError, match=r"members.json: the member list .* was not "
                           r"signed by this federation's CA"):
            async with running(fed.server_settings()):
                pass

    asyncio.run(scenario())
