"""The CA's revocation list on a hospital: the newest one it has seen, kept.

Why a hospital keeps its own: it checks the other hospitals' round keys against the list,
and the server hands the list out; a server offering an older list than one the hospital
already holds could be hiding a revocation, so that is refused.  Lists are CA-signed and
numbered (``securefl.certs``), so a server cannot forge a newer one.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509

from securefl.crypto import pki
from securefl.errors import CryptoError


def accept(ca: x509.Certificate, offered: bytes | None, *, kit: Path | None,
           held: Path) -> frozenset[int]:
    """Revoked serial numbers from the newest list among the kit's, the one ``held`` from
    earlier and the ``offered`` one; a newer offered list replaces ``held``."""
    lists = [pki.load_crl(p.read_bytes(), ca) for p in (kit, held)
             if p is not None and p.is_file()]
    newest = max(lists, key=pki.crl_number, default=None)
    if offered is not None:
        crl = pki.load_crl(offered, ca)
        if newest is not None and pki.crl_number(crl) < pki.crl_number(newest):
            raise CryptoError(
                f"the server handed out an older revocation list (number "
                f"{pki.crl_number(crl)}) than this hospital holds (number "
                f"{pki.crl_number(newest)}): not trusting this server's round; tell the "
                "federation operator")
        if newest is None or pki.crl_number(crl) > pki.crl_number(newest):
            held.parent.mkdir(parents=True, exist_ok=True)
            tmp = held.with_suffix(".tmp")
            tmp.write_bytes(offered)
            os.replace(tmp, held)
            newest = crl
    return pki.revoked_serials(newest) if newest is not None else frozenset()
