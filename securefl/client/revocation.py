"""The CA's revocation list on a hospital: the newest one it has seen, kept.

Why a hospital keeps its own: it checks the other hospitals' round keys and the server's
certificate against the list, and the server hands the list out; a server offering an older
list than one the hospital already holds could be hiding a revocation, so that is refused.
Lists are CA-signed and numbered (``securefl.certs``), so a server cannot forge a newer one.

Why an expired list is still used and never refused: the newer list comes from the server
(or a new kit), so refusing to connect on an expired one would lock the hospital out of the
very connection that brings its replacement.  What it revokes stays revoked; the hospital
is warned.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509

from securefl.crypto import pki
from securefl.errors import CertificateRejectedError, CryptoError


def newest(ca: x509.Certificate, *, kit: Path | None,
           held: Path) -> x509.CertificateRevocationList | None:
    """The highest-numbered list among the kit's and the one ``held`` from earlier."""
    lists = []
    for p in (kit, held):
        if p is not None and p.is_file():
            try:
                lists.append(pki.load_crl(p.read_bytes(), ca))
            except CryptoError as exc:  # name the file and the way on (walking it)
                raise CryptoError(
                    f"{p}: {exc.message}: replace it with the crl.pem of this federation "
                    "(from its operator's latest kit, or `securefl certs` on the CA's "
                    "machine)") from None
    return max(lists, key=pki.crl_number, default=None)


def accept(ca: x509.Certificate, offered: bytes | None, *, kit: Path | None,
           held: Path, server_cert: bytes | None = None) -> frozenset[int]:
    """Revoked serial numbers from the newest list among the kit's, the one ``held`` from
    earlier and the ``offered`` one; a newer offered list replaces ``held``.  With
    ``server_cert`` (DER), a server whose certificate that list revokes is refused."""
    best = newest(ca, kit=kit, held=held)
    if offered is not None:
        crl = pki.load_crl(offered, ca)
        if best is not None and pki.crl_number(crl) < pki.crl_number(best):
            raise CryptoError(
                f"the server handed out an older revocation list (number "
                f"{pki.crl_number(crl)}) than this hospital holds (number "
                f"{pki.crl_number(best)}): not trusting this server's round; tell the "
                "federation operator")
        if best is None or pki.crl_number(crl) > pki.crl_number(best):
            held.parent.mkdir(parents=True, exist_ok=True)
            tmp = held.with_suffix(".tmp")
            tmp.write_bytes(offered)
            os.replace(tmp, held)
            best = crl
    revoked = pki.revoked_serials(best) if best is not None else frozenset()
    if server_cert is not None and best is not None:
        refuse_revoked_server(server_cert, best, where="the server")
    return revoked


def refuse_revoked_server(cert_der: bytes, crl: x509.CertificateRevocationList, *,
                          where: str) -> None:
    """``CertificateRejectedError`` when ``crl`` revokes the server certificate ``cert_der``."""
    serial = pki.load_cert(cert_der).serial_number
    if serial in pki.revoked_serials(crl):
        raise CertificateRejectedError(
            f"{where} presented a server certificate that the federation operator revoked "
            f"(serial {serial:x}, revocation list number {pki.crl_number(crl)}): this "
            "hospital will not talk to it; ask the operator whether the server has a new "
            "certificate, and check the address in hospital.toml")


def check_server(cert_der: bytes, ca: x509.Certificate, *, kit: Path | None, held: Path,
                 where: str, now: dt.datetime | None = None) -> list[str]:
    """Right after the TLS handshake: refuse a server certificate the newest list held
    revokes; returns warnings (an expired list is used anyway, see the module text)."""
    crl = newest(ca, kit=kit, held=held)
    if crl is None:
        return []
    refuse_revoked_server(cert_der, crl, where=where)
    now = now or dt.datetime.now(dt.UTC)
    until = crl.next_update_utc
    if until is not None and until <= now:
        return [f"this hospital's newest revocation list (number {pki.crl_number(crl)}) was "
                f"due for renewal on {until:%Y-%m-%d %H:%M} UTC; it was checked anyway, and "
                "the newer one comes from the server with this connection (or with a new kit "
                "from the federation operator)"]
    return []
