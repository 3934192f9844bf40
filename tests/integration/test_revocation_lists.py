"""The CA's revocation list reaches hospitals over real TLS, and an older one is refused.

Kits bring the list they were made with; the server hands out its current one in
``welcome``; a hospital keeps the newest it has seen (``state/crl.der``) and uses it to
refuse round keys signed by revoked certificates.  A server that offers an older list than
a hospital holds could be hiding a revocation: the hospital refuses to work with it.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from securefl.client.session import HospitalSession
from securefl.crypto import pki
from securefl.errors import CryptoError

from .conftest import Federation, running


def test_hospitals_get_the_current_list_and_refuse_an_older_one(fed: Federation) -> None:
    kit_crl = fed.certs.kit("a") / "crl.pem"
    assert kit_crl.is_file()  # the kit brings the list it was made with
    ca = pki.load_cert(fed.certs.ca_cert.read_bytes())
    old = fed.tmp / "old-crl.pem"
    shutil.copy(fed.certs.crl, old)
    fed.certs.revoke("d")  # a newer list: number + 1, with d's serial
    d_serial = pki.load_cert(fed.certs.member_cert("d").read_bytes()).serial_number
    # The kit on the hospital's machine still holds the old list (copied before).
    shutil.copy(old, kit_crl)

    async def scenario() -> None:
        async with running(fed.server_settings()) as srv:
            settings = fed.client_settings("a", srv.port)
            async with HospitalSession(settings) as h:
                assert d_serial in h.revoked  # learnt from the server, not the kit
            kept = settings.state_dir / "crl.der"
            newest = pki.crl_number(pki.load_crl(kept.read_bytes(), ca))
            assert newest > pki.crl_number(pki.load_crl(old.read_bytes(), ca))
            # The server's file goes back to the older list (a server hiding a revocation).
            shutil.copy(old, fed.certs.crl)
            with pytest.raises(CryptoError, match="older revocation list"):
                async with HospitalSession(settings):
                    pass

    asyncio.run(scenario())
