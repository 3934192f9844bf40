"""Federation certificates in memory: the CA, the server, the admin and each hospital.

Why here and not in ``server/``: the secure-aggregation protocol itself depends on them —
every hospital signs its round keys with its certificate's private key, and every other
hospital checks that signature against the federation CA, so that a curious server cannot
swap keys.  This module only builds and checks certificates; writing them to disk, kits,
revocation lists and the ``securefl certs`` command live in ``securefl.certs``.

Identity is carried in the subject: ``CN`` is the hospital (or admin) name and ``OU`` its
role, so the name a hospital acts under is whatever the CA signed, never what a message
claims.  Keys are ECDSA P-256 (fast, universally supported by TLS 1.3 stacks).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securefl.errors import ConfigError, CryptoError

#: Lifetimes: the server certificate short (renewed routinely), people's longer.
SERVER_LIFETIME = dt.timedelta(days=90)
MEMBER_LIFETIME = dt.timedelta(days=365)
CA_LIFETIME = dt.timedelta(days=3650)

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class Role(StrEnum):
    """What a certificate may do; carried in the subject's OU."""

    CA = "ca"
    SERVER = "server"
    ADMIN = "admin"
    HOSPITAL = "hospital"


@dataclass(frozen=True)
class Credential:
    """A certificate with its private key (the key never leaves the owner's machine)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def name(self) -> str:
        return identity_of(self.cert)[1]

    @property
    def role(self) -> Role:
        return identity_of(self.cert)[0]

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:  # never print key material
        return f"Credential(role={self.role.value!r}, name={self.name!r}, key=<redacted>)"


def check_name(name: str) -> str:
    """Names become file names and log fields: keep them short, lowercase and plain."""
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS or name[0] in "-.":
        raise ConfigError(
            f"'{name}' is not a usable name: use 1-64 characters from a-z, 0-9, '-', '_', '.'"
            " starting with a letter or digit"
        )
    return name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _subject(role: Role, name: str, federation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )


def make_ca(federation: str = "securefl", *, now: dt.datetime | None = None) -> Credential:
    """A fresh federation CA: the single root every party trusts and nothing else."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _subject(Role.CA, f"{federation} CA", federation)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Credential(cert, key)


def issue(
    ca: Credential,
    role: Role,
    name: str,
    *,
    hosts: list[str] | None = None,
    lifetime: dt.timedelta | None = None,
    now: dt.datetime | None = None,
) -> Credential:
    """Issue a server, admin or hospital certificate signed by the federation CA.

    ``hosts`` (server only) become subjectAltNames: IP addresses as IP entries, the rest as
    DNS names, so clients can check they reached the right machine.
    """
    if role is Role.CA:
        raise ConfigError("use make_ca() for the CA")
    check_name(name)
    now = now or _now()
    if lifetime is None:
        lifetime = SERVER_LIFETIME if role is Role.SERVER else MEMBER_LIFETIME
    key = ec.generate_private_key(ec.SECP256R1())
    federation = ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(role, name, str(federation)))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
    )
    if role is Role.SERVER:
        sans: list[x509.GeneralName] = []
        for host in hosts or ["localhost", "127.0.0.1"]:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        eku = [ExtendedKeyUsageOID.SERVER_AUTH]
    else:
        if hosts:
            raise ConfigError("only the server certificate carries host names")
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return Credential(builder.sign(ca.key, hashes.SHA256()), key)


def identity_of(cert: x509.Certificate) -> tuple[Role, str]:
    """The (role, name) a certificate vouches for; refuses certificates we did not shape."""
    try:
        ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        role = Role(str(ou[0].value))
        name = str(cn[0].value)
    except (IndexError, ValueError) as exc:
        raise CryptoError("certificate does not name a securefl role and identity") from exc
    if role is Role.CA:  # the CA's own name is the federation's, free text
        return role, name
    try:
        # Names become file names and log fields everywhere; the CA only ever issues plain
        # ones, and a certificate from elsewhere with another shape is not ours.
        return role, check_name(name)
    except ConfigError:
        raise CryptoError("certificate names an identity securefl never issues "
                          "(1-64 characters from a-z, 0-9, '-', '_', '.')") from None


def verify_issued_by(
    cert: x509.Certificate, ca_cert: x509.Certificate, *, now: dt.datetime | None = None
) -> tuple[Role, str]:
    """Check a member certificate against the federation CA and return its identity.

    Used where TLS has not already done it: key advertisements relayed by the server carry
    each hospital's certificate, and every hospital checks them itself.
    """
    now = now or _now()
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CryptoError("certificate was not issued by this federation's CA") from exc
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise CryptoError(
            f"certificate of '{identity_of(cert)[1]}' is not valid now "
            f"(valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    return identity_of(cert)


def load_cert(data: bytes) -> x509.Certificate:
    """Read a certificate from PEM or DER bytes with one clear error for garbage."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CryptoError("not a readable X.509 certificate") from exc


def load_cert_file(path: Path, what: str = "the federation's CA certificate") -> x509.Certificate:
    """``load_cert`` of a file, with the file named and what it should be (walking it, a key
    file given as ``ca`` said only "not a readable X.509 certificate")."""
    try:
        return load_cert(Path(path).read_bytes())
    except CryptoError:
        raise CryptoError(f"{path} is not a readable X.509 certificate: it should be {what} "
                          "(ca.pem in the kit); check that setting") from None


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def load_crl(data: bytes, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """A revocation list this federation's CA signed (PEM or DER), or ``CryptoError``.

    Why hospitals check it themselves: the server hands it out, and a list it could forge
    would let it hide a revocation from the hospitals that verify each other's round keys.
    """
    try:
        crl = (x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----BEGIN")
               else x509.load_der_x509_crl(data))
    except ValueError as exc:
        raise CryptoError("the revocation list cannot be read") from exc
    public = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(public):  # type: ignore[arg-type]
        raise CryptoError("the revocation list was not signed by this federation's CA")
    return crl


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The list's sequence number (0 for lists made before numbering)."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def revoked_serials(crl: x509.CertificateRevocationList) -> frozenset[int]:
    return frozenset(r.serial_number for r in crl)
