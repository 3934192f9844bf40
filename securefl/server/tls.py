"""The server's TLS context: TLS 1.3, client certificates required, one CA, CRL checked.

Why each setting:

* TLS 1.3 only: no downgrade surface, forward secrecy always.
* ``CERT_REQUIRED`` with only the federation CA loaded: the certificate *is* the identity.
* ``VERIFY_CRL_CHECK_LEAF`` with the CRL loaded: without both, a revoked certificate is
  accepted (measured).  The certificate folder always holds a CRL, possibly empty.
* Key-exchange groups: Python's ``ssl`` cannot set them, so ``openssl.cnf`` beside this
  module fixes X25519/P-256/P-384; ``apply_openssl_conf`` must run before ``ssl`` is first
  imported (the CLI does it, re-executing itself if ``ssl`` was already loaded).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from securefl.errors import ConfigError

if TYPE_CHECKING:
    import asyncio
    import ssl

OPENSSL_CONF = Path(__file__).with_name("openssl.cnf")
WARN_BEFORE = dt.timedelta(days=14)


def apply_openssl_conf() -> bool:
    """Point OpenSSL at our configuration; False if ``ssl`` was loaded too early to apply it."""
    if os.environ.get("OPENSSL_CONF") != str(OPENSSL_CONF):
        os.environ["OPENSSL_CONF"] = str(OPENSSL_CONF)
        return "ssl" not in sys.modules and "_ssl" not in sys.modules
    return True


def check_expiry(cert: Path, crl: Path, *, now: dt.datetime | None = None) -> list[str]:
    """Refuse to start on an expired CRL or server certificate; warn two weeks ahead.

    Why: with CRL checking on, an expired CRL makes OpenSSL refuse *every* hospital, which
    would look like a network fault.  ``securefl certs renew`` renews both.
    """
    now = now or dt.datetime.now(dt.UTC)
    try:
        crl_obj = x509.load_pem_x509_crl(Path(crl).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the revocation list {crl} (not a PEM CRL or not "
                          "readable)") from exc
    try:
        cert_obj = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the server certificate {cert} (not a PEM "
                          "certificate or not readable)") from exc
    warnings = []
    for what, until in (("revocation list", crl_obj.next_update_utc),
                        ("server certificate", cert_obj.not_valid_after_utc)):
        if until is None:
            continue
        if until <= now:
            raise ConfigError(f"the {what} expired on {until:%Y-%m-%d %H:%M} UTC: run "
                              "`securefl certs renew` and copy the new files to the server")
        if until - now < WARN_BEFORE:
            warnings.append(f"the {what} expires on {until:%Y-%m-%d} UTC: run "
                            "`securefl certs renew` soon")
    return warnings


def read_members(path: Path, ca_cert: x509.Certificate) -> bytes:
    """The operator's signed member list as the server hands it out, checked against the CA.

    Why the server checks a list it only relays: a wrong or unsigned file would make every
    hospital refuse to work with the server, which is better said once, at start-up."""
    from securefl.crypto.membership import MemberList
    from securefl.errors import CryptoError

    try:
        data = Path(path).read_bytes()
        MemberList.load(data, ca_cert)
    except OSError as exc:
        raise ConfigError(f"cannot read the member list {path} ({exc.strerror}): copy "
                          "members.json from the operator's certificate folder") from exc
    except CryptoError as exc:
        raise ConfigError(f"{path}: {exc.message}") from exc
    return data


def server_context(cert: Path, key: Path, ca: Path, crl: Path) -> ssl.SSLContext:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    from securefl.certs import check_tls_files

    check_tls_files(cert, key, ca)  # one sentence naming the file at fault
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_verify_locations(cafile=str(crl))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the server's certificates ({cert}, {key}, {ca}, "
                          f"{crl}): {getattr(exc, 'reason', None) or exc}") from exc
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    # No TLS 1.3 session tickets: a resumed session skips the client certificate check, so
    # a ticket let a certificate keep working after it expired (chained tickets: for ever).
    # Every connection is a full handshake; hospitals connect rarely, so it costs little.
    ctx.num_tickets = 0
    return ctx


def limit_tls_buffers(transport: asyncio.BaseTransport, size: int) -> bool:
    """Cap what one TLS connection holds in memory on its way in; False if not possible.

    Why: asyncio's TLS layer receives up to 256 KiB per read into an OpenSSL memory BIO
    and lets it fill to 256 KiB more while the reader is busy.  That BIO's buffer never
    shrinks, so every hospital that has uploaded a model kept ~0.45 MB on the server until
    it disconnected: at 30 hospitals that was more than three models' worth (heaptrack,
    ``bench/round_bench.py --clients 30``).  The high-water mark is public API; the read
    size is only reachable through the transport's protocol (CPython 3.11-3.13 keep it in
    ``_ssl_protocol``), so that part is applied only where it exists.
    """
    transport.set_read_buffer_limits(high=size)  # type: ignore[attr-defined]
    proto = getattr(transport, "_ssl_protocol", None)
    if proto is None or not isinstance(getattr(proto, "_ssl_buffer", None), bytearray):
        return False
    proto.max_size = size
    proto._ssl_buffer = bytearray(size)
    proto._ssl_buffer_view = memoryview(proto._ssl_buffer)
    return True


def revoked_serials(crl: Path) -> frozenset[int]:
    """Serial numbers the CRL file revokes (the server re-checks live connections with it)."""
    try:
        return frozenset(r.serial_number
                         for r in x509.load_pem_x509_crl(Path(crl).read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the revocation list {crl}: copy crl.pem from the "
                          "operator's certificate folder") from exc


def limit_handshake_buffers(size: int) -> bool:
    """Start every TLS connection of this process with a ``size`` read buffer instead of
    asyncio's 256 KiB; False where asyncio keeps it elsewhere.

    Why: asyncio allocates that buffer for each accepted connection before its handshake,
    so connections that never authenticate cost 256 KiB each, and their churn left the
    server's heap fragmented (``bench/conn_churn_bench.py``).  ``limit_tls_buffers`` already
    cut authenticated connections to ``size`` after the handshake; this does it from the
    start.  It changes a class attribute (CPython 3.11-3.13 ``sslproto.SSLProtocol.max_size``,
    the most one read may take), so only the server process applies it (``main.run``).
    """
    from asyncio import sslproto

    proto = getattr(sslproto, "SSLProtocol", None)
    if proto is None or not isinstance(getattr(proto, "max_size", None), int):
        return False
    proto.max_size = size
    return True
