"""The operator's signed member list on a hospital: the newest one it has seen, kept.

Why a hospital keeps its own (as it does the revocation list, ``client.revocation``): it
checks every round's roster against the list, and the server hands the list out; a server
offering an older list than one the hospital already holds could be bringing back a
removed member, so that is refused.  Lists are CA-signed and numbered
(``securefl.crypto.membership``), so a server cannot forge a newer one.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509

from securefl.crypto import pki
from securefl.crypto.membership import MemberList
from securefl.errors import ConfigError, CryptoError


def _read(path: Path, ca: x509.Certificate) -> MemberList:
    try:
        return MemberList.load(path.read_bytes(), ca)
    except CryptoError as exc:
        raise CryptoError(f"{path}: {exc.message}") from exc


def accept(ca: x509.Certificate, offered: bytes | None, *, kit: Path | None, held: Path,
           me: x509.Certificate) -> MemberList:
    """The newest list among the kit's, the one ``held`` from earlier and the ``offered``
    one (a newer offered list replaces ``held``); this hospital's own certificate must be
    on it."""
    lists = [_read(p, ca) for p in (kit, held) if p is not None and p.is_file()]
    newest = max(lists, key=lambda m: m.number, default=None)
    if offered is not None:
        listed = MemberList.load(offered, ca)
        if newest is not None and listed.number < newest.number:
            raise CryptoError(
                f"the server handed out an older member list (number {listed.number}) than "
                f"this hospital holds (number {newest.number}): not trusting this server's "
                "rounds; tell the federation operator")
        if newest is None or listed.number > newest.number:
            held.parent.mkdir(parents=True, exist_ok=True)
            tmp = held.with_suffix(".tmp")
            tmp.write_bytes(offered)
            os.replace(tmp, held)
            newest = listed
    if newest is None:
        raise ConfigError(
            "this hospital holds no signed member list of the federation (members.json in "
            "its kit) and the server handed out none: copy members.json from the operator's "
            "certificate folder into the kit (`securefl certs members` makes one)")
    name = pki.identity_of(me)[1]
    try:
        newest.check_member(name, pki.cert_der(me))
    except CryptoError:
        raise CryptoError(
            f"this hospital's certificate ('{name}') is not the one the federation's signed "
            f"member list (number {newest.number}) names: the operator renewed or removed "
            "it; install hospital.pem and hospital.key from the current kit, or ask the "
            "federation operator") from None
    return newest
