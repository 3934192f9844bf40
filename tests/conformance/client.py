"""An independent securefl hospital client, written from docs/PROTOCOL.md alone.

It exists to check that the protocol document is enough to interoperate with the real
server: nothing here imports `securefl` or was read from its source.  Three layers:

* primitives and byte formats of Appendix A (pure functions, used by vectors.py too);
* `HospitalRound`, the sans-I/O masked round of Appendix B (one object per round);
* `Connection` and the `send_update` / `fetch_global` / `fetch_status` coroutines: TLS 1.3
  with a client certificate, the frames of section 2 and the headers of section 3.

Only the full graph (k = n - 1) is supported: a sparse roster is refused, as section 5
allows for a client that does not reproduce the SecAgg+ analysis.

Not implemented (a real client needs them; the conformance tests do not): the state that
survives a process (section 5's refusal of a repeated round number, section 6's
cross-round rule and `max_attempts`, keeping the newest CRL and member list on disk),
rejoining a `retry_round`, and `masking = "plain"` (always refused).

Run as ``python -m tests.conformance.client --config hospital.toml get|status|send``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import secrets
import ssl
import struct
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

PROTOCOL = 4
P = 2**256 + 297  # the Shamir field (A.7)
SHARE_LEN = 33
ENVELOPE_LEN = 102
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 31


class ClientError(Exception):
    """A failure with a protocol error code (section 6) and a sentence for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ServerError(ClientError):
    """The server answered a request with an `error` frame."""

    def __init__(self, code: str, message: str, rid: int, version: int | None = None) -> None:
        super().__init__(code, message)
        self.rid = rid
        self.version = version


class RoundRefused(ClientError):
    """This hospital's own checks refused the round (Appendix B: stop, send nothing more)."""


class RoundAbandoned(ClientError):
    """The server ended the round with `round_done` `resend: true`."""

    def __init__(self, code: str, message: str, retry_round: int) -> None:
        super().__init__(code, message)
        self.retry_round = retry_round


# --------------------------------------------------------------------------------------
# Randomness (A.10)


class Randomness:
    """Every random value a hospital draws in one round, in the order of A.10.

    The default draws from the operating system; a test harness subclasses it (or uses
    `FixedRandomness`) to reproduce test vectors.
    """

    def c_sk(self) -> bytes:
        return os.urandom(32)

    def s_sk(self) -> bytes:
        return os.urandom(32)

    def graph_value(self) -> bytes:
        return os.urandom(32)

    def b_u(self) -> bytes:
        return os.urandom(32)

    def b_coefficients(self, count: int) -> list[int]:
        return [secrets.randbelow(P) for _ in range(count)]

    def s_coefficients(self, count: int) -> list[int]:
        return [secrets.randbelow(P) for _ in range(count)]

    def envelope_nonce(self, recipient: int) -> bytes:
        """One nonce per envelope, asked for neighbours in ascending order."""
        return os.urandom(12)


class FixedRandomness(Randomness):
    """Values given up front (test vectors); each may be drawn once."""

    def __init__(
        self,
        c_sk: bytes,
        s_sk: bytes,
        graph_value: bytes,
        b_u: bytes,
        b_coefficients: list[int],
        s_coefficients: list[int],
        envelope_nonces: dict[int, bytes],
    ) -> None:
        self._values = {
            "c_sk": c_sk,
            "s_sk": s_sk,
            "graph_value": graph_value,
            "b_u": b_u,
            "b_coefficients": list(b_coefficients),
            "s_coefficients": list(s_coefficients),
        }
        self._nonces = dict(envelope_nonces)

    def _take(self, what: str) -> Any:
        if what not in self._values:
            raise RuntimeError(f"fixed randomness: {what} drawn twice")
        return self._values.pop(what)

    def c_sk(self) -> bytes:
        return self._take("c_sk")

    def s_sk(self) -> bytes:
        return self._take("s_sk")

    def graph_value(self) -> bytes:
        return self._take("graph_value")

    def b_u(self) -> bytes:
        return self._take("b_u")

    def b_coefficients(self, count: int) -> list[int]:
        values = self._take("b_coefficients")
        if len(values) != count:
            raise RuntimeError(f"fixed randomness: {count} b coefficients asked, {len(values)}")
        return values

    def s_coefficients(self, count: int) -> list[int]:
        values = self._take("s_coefficients")
        if len(values) != count:
            raise RuntimeError(f"fixed randomness: {count} s coefficients asked, {len(values)}")
        return values

    def envelope_nonce(self, recipient: int) -> bytes:
        return self._nonces.pop(recipient)


# --------------------------------------------------------------------------------------
# Primitives (A.1, A.2)


def u16(x: int) -> bytes:
    return struct.pack(">H", x)


def u32(x: int) -> bytes:
    return struct.pack(">I", x)


def u64(x: int) -> bytes:
    return struct.pack(">Q", x)


def f64(x: float) -> bytes:
    return struct.pack(">d", float(x))


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def round_context(round_id: int, base_version: int) -> bytes:
    return u64(round_id) + u64(base_version)


def hkdf(ikm: bytes, label: str, c: bytes) -> bytes:
    """HKDF-SHA256, no salt, info = "securefl/v1/" label "|" c (A.2)."""
    info = b"securefl/v1/" + label.encode() + b"|" + c
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


def prg(seed: bytes, m: int, ring_bits: int) -> np.ndarray:
    """m ring elements from the AES-256-CTR keystream under `seed` (A.2)."""
    width = ring_bits // 8
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = enc.update(bytes(m * width)) + enc.finalize()
    return np.frombuffer(stream, dtype="<u4" if ring_bits == 32 else "<u8").copy()


def x25519_public(sk: bytes) -> bytes:
    key = x25519.X25519PrivateKey.from_private_bytes(sk)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_shared(sk: bytes, pk: bytes) -> bytes:
    """X25519 agreement; a low-order peer key (all-zero result) is refused."""
    try:
        out = x25519.X25519PrivateKey.from_private_bytes(sk).exchange(
            x25519.X25519PublicKey.from_public_bytes(pk)
        )
    except ValueError as exc:  # cryptography refuses the all-zero result itself
        raise RoundRefused("crypto", "a round key is a low-order X25519 point") from exc
    if out == bytes(32):
        raise RoundRefused("crypto", "a round key is a low-order X25519 point")
    return out


def sign(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, message: bytes) -> bytes:
    """Sign(key, m) of A.2: deterministic ECDSA P-256/SHA-256 (RFC 6979), or Ed25519."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def verify(cert: x509.Certificate, signature: bytes, message: bytes) -> bool:
    pub = cert.public_key()
    try:
        if isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(signature, message)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


# --------------------------------------------------------------------------------------
# Hashes and signed statements (A.3)


def advertisement_bytes(
    round_id: int, base_version: int, name: str, base_sha256: bytes, graph_commit: bytes,
    c_pk: bytes, s_pk: bytes,
) -> bytes:
    nb = name.encode()
    return (
        b"securefl/v4/advertise\0" + u64(round_id) + u64(base_version) + u16(len(nb))
        + base_sha256 + graph_commit + nb + c_pk + s_pk
    )


def graph_commitment(round_id: int, base_version: int, name: str, value: bytes) -> bytes:
    nb = name.encode()
    return sha256(
        b"securefl/v4/graph-commit\0" + u64(round_id) + u64(base_version) + u16(len(nb)) + nb
        + value
    )


@dataclass(frozen=True)
class Participant:
    """One roster entry, bytes decoded."""

    name: str
    c_pk: bytes
    s_pk: bytes
    cert_der: bytes
    signature: bytes
    base_sha256: bytes
    graph_commit: bytes


@dataclass(frozen=True)
class Encoding:
    """The fixed-point encoding of A.4."""

    ring_bits: int
    clip: float
    scale: float
    max_clients: int
    max_weight: int

    def fits(self) -> bool:
        if self.ring_bits not in (32, 64) or not (self.clip > 0 and self.scale > 0):
            return False
        if self.max_clients < 1 or self.max_weight < 1:
            return False
        total = float(self.max_clients) * float(self.max_weight) * (self.clip * self.scale + 0.5)
        return total <= float(2 ** (self.ring_bits - 1) - 1)

    @property
    def dtype(self) -> str:
        return "<u4" if self.ring_bits == 32 else "<u8"

    def weight(self, samples: int) -> int:
        return min(int(samples), self.max_weight)

    def encode(self, delta: np.ndarray, samples: int) -> np.ndarray:
        w = self.weight(samples)
        c = np.clip(np.asarray(delta, dtype=np.float32).astype(np.float64), -self.clip, self.clip)
        f = float(w) * float(self.scale)
        q = np.rint(c * f).astype(np.int64)
        out = np.empty(len(q) + 1, dtype=np.int64)
        out[:-1] = q
        out[-1] = w
        if self.ring_bits == 32:
            return (out & 0xFFFFFFFF).astype(np.uint32)
        return out.view(np.uint64)

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """(mean as float32, W) from an unmasked sum."""
        signed = total.astype(np.uint32).view(np.int32) if self.ring_bits == 32 else \
            total.astype(np.uint64).view(np.int64)
        w = int(signed[-1])
        mean = (signed[:-1].astype(np.float64) / (float(self.scale) * w)).astype(np.float32)
        return mean, w

    def error_bound(self, contributors: int, total_weight: int) -> float:
        return contributors / (2 * self.scale * total_weight) + self.clip * 2.0**-23


@dataclass(frozen=True)
class RosterParams:
    round_id: int
    base_version: int
    vector_len: int
    threshold: int
    neighbours: int
    min_contributors: int
    encoding: Encoding


def roster_digest_input(params: RosterParams, participants: list[Participant]) -> bytes:
    e = params.encoding
    out = [
        b"securefl/v4/roster\0", u64(params.round_id), u64(params.base_version),
        u64(params.vector_len), u16(params.threshold), u16(params.neighbours),
        u16(params.min_contributors), u16(e.ring_bits), f64(e.clip), f64(e.scale),
        u64(e.max_clients), u64(e.max_weight),
    ]
    for p in participants:
        a = advertisement_bytes(
            params.round_id, params.base_version, p.name, p.base_sha256, p.graph_commit,
            p.c_pk, p.s_pk,
        )
        for part in (a, p.cert_der, p.signature):
            out.append(u32(len(part)) + part)
    return b"".join(out)


def roster_digest(params: RosterParams, participants: list[Participant]) -> bytes:
    return sha256(roster_digest_input(params, participants))


def roster_statement(round_id: int, base_version: int, digest: bytes) -> bytes:
    return b"securefl/v4/roster-ack\0" + u64(round_id) + u64(base_version) + digest


def graph_seed(ctx: bytes, values: list[bytes]) -> bytes:
    return sha256(b"securefl/v4/graph-seed\0" + ctx + b"".join(values))


def survivors_statement(
    round_id: int, base_version: int, base_sha256: bytes, digest: bytes, survivors: list[int]
) -> bytes:
    return (
        b"securefl/v4/survivors\0" + u64(round_id) + u64(base_version) + base_sha256 + digest
        + u16(len(survivors)) + b"".join(u16(s) for s in survivors)
    )


def share_digest(kind: str, ctx: bytes, dealer: int, holder: int, share: bytes) -> bytes:
    return sha256(
        b"securefl/v4/share-digest\0" + kind.encode() + ctx + u32(dealer) + u32(holder) + share
    )


def b_commitment(ctx: bytes, dealer: int, b_u: bytes) -> bytes:
    return sha256(b"securefl/v4/self-mask-commit\0" + ctx + u32(dealer) + b_u)


# --------------------------------------------------------------------------------------
# Graph (A.6), Shamir (A.7), envelopes (A.8)


def neighbours(n: int, k: int, me: int) -> list[int]:
    """N(me); only the full graph (classic SecAgg) is implemented."""
    if k < n - 1:
        raise RoundRefused("crypto", f"a sparse graph (k = {k} < n - 1 = {n - 1}) is refused")
    return [v for v in range(1, n + 1) if v != me]


def shamir_share(secret: bytes, coefficients: list[int], holders: list[int]) -> dict[int, int]:
    s = int.from_bytes(secret, "big")
    poly = [s, *coefficients]
    out = {}
    for x in holders:
        acc = 0
        for a in reversed(poly):
            acc = (acc * x + a) % P
        out[x] = acc
    return out


def shamir_reconstruct(shares: dict[int, int], t: int) -> bytes:
    """Lagrange at 0 over the t lowest x-coordinates (A.7)."""
    xs = sorted(shares)[:t]
    if len(xs) < t:
        raise ClientError("crypto", f"{len(xs)} shares given, {t} needed")
    secret = 0
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * (-j) % P
                den = den * (i - j) % P
        secret = (secret + shares[i] * num * pow(den, -1, P)) % P
    if secret >= 2**256:
        raise ClientError("crypto", "the shares are inconsistent")
    return secret.to_bytes(32, "big")


def share_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_LEN, "big")


def share_value(data: bytes) -> int:
    if len(data) != SHARE_LEN:
        raise RoundRefused("crypto", f"a share has {len(data)} bytes, not {SHARE_LEN}")
    v = int.from_bytes(data, "big")
    if v >= P:
        raise RoundRefused("crypto", "a share is not below the field prime")
    return v


def envelope_key(c_sk: bytes, c_pk_other: bytes, ctx: bytes) -> bytes:
    return hkdf(x25519_shared(c_sk, c_pk_other), "envelope", ctx)


def envelope_ad(round_id: int, base_version: int, sender: int, recipient: int) -> bytes:
    return (
        b"securefl/v1/envelope\0" + u64(round_id) + u64(base_version) + u32(sender)
        + u32(recipient)
    )


def seal_envelope(
    key: bytes, nonce: bytes, round_id: int, base_version: int, sender: int, recipient: int,
    b_share: bytes, s_share: bytes,
) -> bytes:
    plain = u32(sender) + u32(recipient) + b_share + s_share
    ad = envelope_ad(round_id, base_version, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, plain, ad)


def open_envelope(
    key: bytes, envelope: bytes, round_id: int, base_version: int, sender: int, recipient: int,
) -> tuple[bytes, bytes]:
    if len(envelope) != ENVELOPE_LEN:
        raise RoundRefused("crypto", f"the envelope from {sender} has {len(envelope)} bytes")
    ad = envelope_ad(round_id, base_version, sender, recipient)
    try:
        plain = AESGCM(key).decrypt(envelope[:12], envelope[12:], ad)
    except InvalidTag as exc:
        raise RoundRefused("crypto", f"the envelope from {sender} does not authenticate") from exc
    if plain[:8] != u32(sender) + u32(recipient):
        raise RoundRefused("crypto", f"the envelope from {sender} names other parties")
    b_share, s_share = plain[8:41], plain[41:74]
    share_value(b_share)
    share_value(s_share)
    return b_share, s_share


# --------------------------------------------------------------------------------------
# Certificates, revocation list, member list


def cert_field(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(oid)
    return str(attrs[0].value) if len(attrs) == 1 else None


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def members_message(body: dict) -> bytes:
    return b"securefl member list v1\n" + json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode()


def parse_members(data: bytes, ca: x509.Certificate) -> dict:
    """The member list document, refused unless CA-signed."""
    doc = json.loads(data)
    body = doc["body"]
    sig = base64.b64decode(doc["signature"], validate=True)
    if not verify(ca, sig, members_message(body)):
        raise RoundRefused("crypto", "the member list is not signed by the federation CA")
    return body


@dataclass
class Identity:
    """What a hospital holds: its certificate and key, and what it trusts."""

    name: str
    key: Any  # private key of the certificate
    cert_der: bytes
    ca: x509.Certificate
    crl: x509.CertificateRevocationList | None = None
    members: dict | None = None  # member list body

    def revoked(self, cert: x509.Certificate) -> bool:
        return self.crl is not None and \
            self.crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

    def take_crl(self, der: bytes) -> None:
        crl = x509.load_der_x509_crl(der)
        if not crl.is_signature_valid(self.ca.public_key()):
            raise RoundRefused("crypto", "the offered revocation list is not signed by the CA")
        if self.crl is not None and crl_number(crl) < crl_number(self.crl):
            raise RoundRefused("crypto", "the server offered an older revocation list than ours")
        self.crl = crl

    def take_members(self, data: bytes) -> None:
        body = parse_members(data, self.ca)
        if self.members is not None and body["number"] < self.members["number"]:
            raise RoundRefused("crypto", "the server offered an older member list than ours")
        self.members = body


@dataclass
class Policy:
    """[policy] defaults of docs/QUICKSTART.md section 3."""

    colluders: int = 1
    min_contributors: int = 2
    ring_bits: tuple[int, ...] = (32, 64)
    max_clip: float = 10.0


# --------------------------------------------------------------------------------------
# The round, sans I/O (Appendix B steps 4-12)


@dataclass
class Trace:
    """Intermediate values, for test vectors and debugging."""

    values: dict[str, Any] = field(default_factory=dict)


class HospitalRound:
    """One masked round of one hospital; each `on_*` method is one step of Appendix B."""

    def __init__(
        self, identity: Identity, *, base_version: int, base_sha256: bytes, update: np.ndarray,
        samples: int, policy: Policy | None = None, rng: Randomness | None = None,
        now: dt.datetime | None = None,
    ) -> None:
        update = np.asarray(update, dtype=np.float32)
        if update.ndim != 1 or not np.all(np.isfinite(update)) or not np.any(update):
            raise RoundRefused("data", "the update must be a finite, not all-zero vector")
        if samples < 1:
            raise RoundRefused("data", "the sample count must be at least 1")
        self.id = identity
        self.base_version = base_version
        self.base_sha256 = base_sha256
        self.update = update
        self.samples = samples
        self.policy = policy or Policy()
        self.rng = rng or Randomness()
        self.now = now
        self.trace: dict[str, Any] = {}
        self.step = "new"

    def _expect(self, step: str, nxt: str) -> None:
        if self.step != step:
            raise RoundRefused("remote-protocol", f"a message out of order (in step {self.step})")
        self.step = nxt

    # step 4
    def on_joined(self, joined: dict) -> None:
        self._expect("new", "joined")
        if joined["masking"] != "secagg":
            raise RoundRefused("crypto", "the server asked for the update unmasked")
        if joined["base_version"] != self.base_version:
            raise RoundRefused("remote-protocol", "joined names another base version")
        enc = Encoding(
            joined["ring_bits"], float(joined["clip"]), float(joined["scale"]),
            joined["max_clients"], joined["max_weight"],
        )
        if not enc.fits() or enc.ring_bits not in self.policy.ring_bits \
                or enc.clip > self.policy.max_clip:
            raise RoundRefused("crypto", f"the encoding {enc} is refused by this hospital")
        if joined["vector_len"] != len(self.update):
            raise RoundRefused(
                "data", f"the round wants {joined['vector_len']} values, the update has "
                f"{len(self.update)}"
            )
        self.round_id = joined["round_id"]
        self.encoding = enc
        self.ctx = round_context(self.round_id, self.base_version)

    # step 5
    def advertise(self) -> dict[str, bytes]:
        self._expect("joined", "advertised")
        self.c_sk = self.rng.c_sk()
        self.s_sk = self.rng.s_sk()
        self.value = self.rng.graph_value()
        self.c_pk = x25519_public(self.c_sk)
        self.s_pk = x25519_public(self.s_sk)
        self.graph_commit = graph_commitment(
            self.round_id, self.base_version, self.id.name, self.value
        )
        adv = advertisement_bytes(
            self.round_id, self.base_version, self.id.name, self.base_sha256, self.graph_commit,
            self.c_pk, self.s_pk,
        )
        self.signature = sign(self.id.key, adv)
        self.trace.update(advertisement=adv, advertisement_signature=self.signature)
        return {
            "c_pk": self.c_pk, "s_pk": self.s_pk, "signature": self.signature,
            "base_sha256": self.base_sha256, "graph_commit": self.graph_commit,
        }

    def _check_cert(self, p: Participant) -> x509.Certificate:
        try:
            cert = x509.load_der_x509_certificate(p.cert_der)
            cert.verify_directly_issued_by(self.id.ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise RoundRefused("crypto", f"{p.name}'s certificate is not from our CA") from exc
        now = self.now or dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise RoundRefused("crypto", f"{p.name}'s certificate is not valid now")
        if self.id.revoked(cert):
            raise RoundRefused("crypto", f"{p.name}'s certificate is revoked")
        if cert_field(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) != "hospital" \
                or cert_field(cert, NameOID.COMMON_NAME) != p.name:
            raise RoundRefused("crypto", f"{p.name}'s certificate is not a hospital named so")
        if self.id.members is not None and \
                self.id.members["members"].get(p.name) != hashlib.sha256(p.cert_der).hexdigest():
            raise RoundRefused("crypto", f"{p.name} is not a member with that certificate")
        return cert

    # step 6
    def on_roster(self, params: RosterParams, participants: list[Participant]) -> bytes:
        self._expect("advertised", "roster")
        if (params.round_id, params.base_version) != (self.round_id, self.base_version) \
                or params.encoding != self.encoding or params.vector_len != len(self.update):
            raise RoundRefused("crypto", "the roster's round or encoding differs from joined's")
        names = [p.name for p in participants]
        if names != sorted(names, key=str.encode) or len(set(names)) != len(names):
            raise RoundRefused("crypto", "the roster's names are not sorted and unique")
        if self.id.name not in names:
            raise RoundRefused("crypto", "the roster does not name this hospital")
        n = len(participants)
        self.me = names.index(self.id.name) + 1
        mine = participants[self.me - 1]
        if (mine.c_pk, mine.s_pk, mine.signature, mine.base_sha256, mine.graph_commit,
                mine.cert_der) != (self.c_pk, self.s_pk, self.signature, self.base_sha256,
                                   self.graph_commit, self.id.cert_der):
            raise RoundRefused("crypto", "the roster changed this hospital's own advertisement")
        self.certs: dict[int, x509.Certificate] = {}
        for i, p in enumerate(participants, 1):
            if len(p.c_pk) != 32 or len(p.s_pk) != 32 or len(p.graph_commit) != 32:
                raise RoundRefused("crypto", f"{p.name}'s keys have the wrong length")
            if p.base_sha256 != self.base_sha256:
                raise RoundRefused("crypto", f"{p.name} received other model bytes")
            cert = self._check_cert(p) if i != self.me else \
                x509.load_der_x509_certificate(p.cert_der)
            adv = advertisement_bytes(
                params.round_id, params.base_version, p.name, p.base_sha256, p.graph_commit,
                p.c_pk, p.s_pk,
            )
            if not verify(cert, p.signature, adv):
                raise RoundRefused("crypto", f"{p.name}'s advertisement signature is invalid")
            self.certs[i] = cert
        keys = [p.c_pk for p in participants] + [p.s_pk for p in participants]
        commits = [p.graph_commit for p in participants]
        if len(set(keys)) != 2 * n or len(set(commits)) != n:
            raise RoundRefused("crypto", "the roster repeats a key or a graph commitment")
        k, t, c = params.neighbours, params.threshold, self.policy.colluders
        if not 1 <= k <= n - 1:
            raise RoundRefused("crypto", f"neighbours k = {k} is outside 1..{n - 1}")
        if k < n - 1:
            raise RoundRefused("crypto", "a sparse graph is refused by this client")
        if not ((k + 1) / 2 < t <= k + 1) or t < (k + 1 + c) // 2 + 1:
            raise RoundRefused("crypto", f"threshold t = {t} is refused for k = {k}, c = {c}")
        if n < max(2, self.policy.min_contributors, c + 2) or params.min_contributors < 2 \
                or n > params.encoding.max_clients:
            raise RoundRefused("crypto", f"a round of {n} hospitals is refused")
        self.params = params
        self.participants = participants
        self.n = n
        self.digest = roster_digest(params, participants)
        self.statement = roster_statement(params.round_id, params.base_version, self.digest)
        sig = sign(self.id.key, self.statement)
        self.trace.update(roster_digest=self.digest, roster_statement=self.statement,
                          roster_ack_signature=sig)
        return sig

    # step 7
    def on_roster_acks(self, signatures: dict[int, bytes]) -> bytes:
        self._expect("roster", "acked")
        if set(signatures) != set(range(1, self.n + 1)):
            raise RoundRefused("crypto", "roster_acks does not carry exactly 1..n")
        for i, sig in signatures.items():
            if not verify(self.certs[i], sig, self.statement):
                raise RoundRefused("crypto", f"participant {i} signed another roster")
        return self.value

    # step 8
    def on_seed_reveals(self, values: dict[int, bytes]) -> dict[str, Any]:
        self._expect("acked", "shared")
        if set(values) != set(range(1, self.n + 1)) or values[self.me] != self.value:
            raise RoundRefused("crypto", "seed_reveals is not exactly 1..n with our own value")
        for i, v in values.items():
            p = self.participants[i - 1]
            if len(v) != 32 or graph_commitment(
                    self.round_id, self.base_version, p.name, v) != p.graph_commit:
                raise RoundRefused("crypto", f"participant {i}'s value opens no commitment")
        self.graph_seed = graph_seed(self.ctx, [values[i] for i in range(1, self.n + 1)])
        self.neighbours = neighbours(self.n, self.params.neighbours, self.me)
        holders = sorted([*self.neighbours, self.me])
        t = self.params.threshold
        self.b_u = self.rng.b_u()
        b_coef = self.rng.b_coefficients(t - 1)
        s_coef = self.rng.s_coefficients(t - 1)
        b_sh = {h: share_bytes(v) for h, v in shamir_share(self.b_u, b_coef, holders).items()}
        s_sh = {h: share_bytes(v) for h, v in shamir_share(self.s_sk, s_coef, holders).items()}
        envelopes, keys, nonces = {}, {}, {}
        for v in sorted(self.neighbours):
            key = envelope_key(self.c_sk, self.participants[v - 1].c_pk, self.ctx)
            nonce = self.rng.envelope_nonce(v)
            envelopes[v] = seal_envelope(
                key, nonce, self.round_id, self.base_version, self.me, v, b_sh[v], s_sh[v]
            )
            keys[v], nonces[v] = key, nonce
        digests = {
            h: share_digest("b", self.ctx, self.me, h, b_sh[h])
            + share_digest("s", self.ctx, self.me, h, s_sh[h])
            for h in holders
        }
        b_commit = b_commitment(self.ctx, self.me, self.b_u)
        self.held_b = {self.me: b_sh[self.me]}
        self.held_s = {self.me: s_sh[self.me]}
        self.trace.update(
            graph_seed=self.graph_seed, neighbours=self.neighbours, b_shares=b_sh, s_shares=s_sh,
            envelope_keys=keys, envelope_nonces=nonces, envelopes=envelopes, digests=digests,
            b_commit=b_commit,
        )
        return {"envelopes": envelopes, "digests": digests, "b_commit": b_commit}

    # steps 9 and 10
    def on_envelopes(
        self, recipient: int, envelopes: dict[int, bytes], digests: dict[int, bytes]
    ) -> np.ndarray:
        self._expect("shared", "masked")
        if recipient != self.me:
            raise RoundRefused("crypto", "the envelopes are addressed to another participant")
        senders = sorted(envelopes)
        if not set(senders) <= set(self.neighbours) or set(digests) != set(senders):
            raise RoundRefused("crypto", "envelopes from non-neighbours, or digests missing")
        if len(senders) + 1 < self.params.threshold:
            raise RoundRefused("crypto", "too few hospitals' shares reached this hospital")
        for u in senders:
            key = envelope_key(self.c_sk, self.participants[u - 1].c_pk, self.ctx)
            b_share, s_share = open_envelope(
                key, envelopes[u], self.round_id, self.base_version, u, self.me
            )
            want = share_digest("b", self.ctx, u, self.me, b_share) + \
                share_digest("s", self.ctx, u, self.me, s_share)
            if digests[u] != want:
                raise RoundRefused("crypto", f"participant {u}'s share digests do not match")
            self.held_b[u], self.held_s[u] = b_share, s_share
        self.senders = senders
        enc = self.encoding
        m = len(self.update) + 1
        encoded = enc.encode(self.update, self.samples)
        self_seed = hkdf(self.b_u, "self-mask", self.ctx)
        self_mask = prg(self_seed, m, enc.ring_bits)
        y = encoded + self_mask
        pair: dict[int, dict[str, Any]] = {}
        for v in senders:
            seed = hkdf(x25519_shared(self.s_sk, self.participants[v - 1].s_pk), "pair-mask",
                        self.ctx)
            mask = prg(seed, m, enc.ring_bits)
            y = y + mask if v > self.me else y - mask
            pair[v] = {"seed": seed, "mask": mask, "sign": "+" if v > self.me else "-"}
        self.update = None  # forget the update (B step 10)
        self.trace.update(encoded=encoded, self_mask_seed=self_seed, self_mask=self_mask,
                          pair_masks=pair, masked_input=y)
        return y

    # step 11
    def on_survivor_list(self, survivors: list[int]) -> bytes:
        self._expect("masked", "signed")
        if survivors != sorted(set(survivors)) or not set(survivors) <= set(range(1, self.n + 1)):
            raise RoundRefused("crypto", "the survivor list is not sorted, unique, on the roster")
        if self.me not in survivors:
            raise RoundRefused("crypto", "the survivor list does not name this hospital")
        if not {v for v in survivors if v in self.neighbours} <= set(self.senders):
            raise RoundRefused("crypto", "the survivor list names a hospital that shared no keys")
        need = max(self.params.threshold, self.params.min_contributors,
                   self.policy.min_contributors, self.policy.colluders + 2)
        if len(survivors) < need:
            raise RoundRefused("crypto", f"a survivor list of {len(survivors)} (< {need})")
        self.survivors = list(survivors)
        self.survivor_statement = survivors_statement(
            self.round_id, self.base_version, self.base_sha256, self.digest, self.survivors
        )
        sig = sign(self.id.key, self.survivor_statement)
        self.trace.update(survivor_statement=self.survivor_statement, survivor_signature=sig)
        return sig

    # step 12
    def on_unmask_request(
        self, survivors: list[int], signatures: dict[int, bytes]
    ) -> tuple[dict[int, bytes], dict[int, bytes]]:
        self._expect("signed", "answered")
        if survivors != self.survivors:
            raise RoundRefused("crypto", "the unmask request has another survivor list")
        for i, sig in signatures.items():
            if i not in self.survivors or not verify(self.certs[i], sig, self.survivor_statement):
                raise RoundRefused("crypto", f"participant {i}'s survivor signature is invalid")
        signers = set(signatures)
        for u in self.held_b:
            holders = {*neighbours(self.n, self.params.neighbours, u), u}
            if len(holders & signers) < self.params.threshold:
                raise RoundRefused("crypto", f"too few of {u}'s share holders signed the list")
        b_out = {u: s for u, s in self.held_b.items() if u in self.survivors}
        s_out = {u: s for u, s in self.held_s.items() if u not in self.survivors}
        self.trace.update(unmask_b_shares=b_out, unmask_s_shares=s_out)
        return b_out, s_out


def unmask_sum(
    params: RosterParams, participants: list[Participant], masked: dict[int, np.ndarray],
    shared: list[int], b_answers: dict[int, dict[int, bytes]],
    s_answers: dict[int, dict[int, bytes]],
) -> np.ndarray:
    """The server's side of A.5 for the full graph: remove every mask, return the sum.

    `masked` maps survivor -> y, `shared` lists who shared keys, `*_answers` map holder ->
    {owner: share} as in `unmask_response`.
    """
    enc, t = params.encoding, params.threshold
    ctx = round_context(params.round_id, params.base_version)
    m = params.vector_len + 1
    dtype = np.uint32 if enc.ring_bits == 32 else np.uint64
    total = np.zeros(m, dtype=dtype)
    for y in masked.values():
        total = total + y
    n = len(participants)
    for u in masked:
        b_u = shamir_reconstruct({h: share_value(a[u]) for h, a in b_answers.items() if u in a}, t)
        total = total - prg(hkdf(b_u, "self-mask", ctx), m, enc.ring_bits)
    for u in shared:
        if u in masked:
            continue
        s_sk = shamir_reconstruct(
            {h: share_value(a[u]) for h, a in s_answers.items() if u in a}, t
        )
        for v in neighbours(n, params.neighbours, u):
            if v in masked:
                seed = hkdf(x25519_shared(s_sk, participants[v - 1].s_pk), "pair-mask", ctx)
                mask = prg(seed, m, enc.ring_bits)
                total = total - mask if v < u else total + mask
    return total


# --------------------------------------------------------------------------------------
# The wire: frames (section 2) and headers (section 3)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def b64_map(values: dict[int, bytes]) -> dict[str, str]:
    return {str(k): b64(v) for k, v in sorted(values.items())}


def unb64_map(values: dict[str, str]) -> dict[int, bytes]:
    return {int(k): unb64(v) for k, v in values.items()}


def encode_frame(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">IBI", 5 + len(head) + len(payload), 1, len(head)) + head + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict, bytes]:
    prefix = await reader.readexactly(9)
    frame_len, frame_type, header_len = struct.unpack(">IBI", prefix)
    if frame_type != 1 or not 1 <= header_len <= MAX_HEADER or frame_len < 5 + header_len \
            or frame_len - 5 - header_len > MAX_PAYLOAD:
        raise ClientError("malformed-frame", "the server sent a frame that breaks section 2")
    header = json.loads(await reader.readexactly(header_len))
    payload = await reader.readexactly(frame_len - 5 - header_len)
    return header, payload


def array_of(header: dict, payload: bytes) -> np.ndarray:
    spec = header["array"]
    return np.frombuffer(payload, dtype=spec["dtype"]).reshape(spec["shape"])


def roster_from_push(push: dict) -> tuple[RosterParams, list[Participant]]:
    enc = Encoding(push["ring_bits"], float(push["clip"]), float(push["scale"]),
                   push["max_clients"], push["max_weight"])
    params = RosterParams(push["round_id"], push["base_version"], push["vector_len"],
                          push["threshold"], push["neighbours"], push["min_contributors"], enc)
    people = [
        Participant(p["name"], unb64(p["c_pk"]), unb64(p["s_pk"]), unb64(p["cert_der"]),
                    unb64(p["signature"]), unb64(p["base_sha256"]), unb64(p["graph_commit"]))
        for p in push["participants"]
    ]
    return params, people


class Connection:
    """One TLS connection: requests matched to replies by rid, pushes queued."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._rid = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.pushes: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._read_loop())
        self.server_cert_der: bytes = writer.get_extra_info("ssl_object").getpeercert(True)

    @classmethod
    async def open(
        cls, host: str, port: int, *, cert: Path, key: Path, ca: Path,
        identity: Identity | None = None,
    ) -> Connection:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
        conn = cls(reader, writer)
        if identity is not None and identity.revoked(
                x509.load_der_x509_certificate(conn.server_cert_der)):
            await conn.close()
            raise ClientError("crypto", "the server's certificate is revoked; not talking to it")
        return conn

    async def _read_loop(self) -> None:
        try:
            while True:
                header, payload = await read_frame(self.reader)
                rid = header.get("rid", 0)
                fut = self._pending.pop(rid, None) if rid else None
                if fut is not None:
                    fut.set_result((header, payload))
                elif header.get("kind") == "error" and rid == 0 and self._pending:
                    for f in self._pending.values():
                        f.set_result((header, payload))
                    self._pending.clear()
                else:
                    await self.pushes.put((header, payload))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ClientError) as exc:
            for f in self._pending.values():
                if not f.done():
                    f.set_exception(ClientError("closed", f"the connection closed ({exc!r})"))
            self._pending.clear()
            await self.pushes.put(({"kind": "_closed"}, b""))

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    async def send(self, header: dict, payload: bytes = b"") -> None:
        self.writer.write(encode_frame(header, payload))
        await self.writer.drain()

    async def exchange(self, header: dict, payload: bytes = b"") -> tuple[dict, bytes]:
        """Send a header with its own integer `rid`; return the reply, `error` included."""
        fut = asyncio.get_running_loop().create_future()
        self._pending[header["rid"]] = fut
        await self.send(header, payload)
        return await fut

    async def request(self, kind: str, payload: bytes = b"", **fields: Any) -> tuple[dict, bytes]:
        """Send one request; return its reply, or raise ServerError for an `error`."""
        header, body = await self.exchange(
            {"kind": kind, "rid": self.next_rid(), **fields}, payload
        )
        if header.get("kind") == "error":
            raise ServerError(header["code"], header["message"], header["rid"],
                              header.get("version"))
        return header, body

    async def push(self, timeout: float | None = None) -> tuple[dict, bytes]:
        header, payload = await asyncio.wait_for(self.pushes.get(), timeout)
        if header["kind"] == "_closed":
            raise ClientError("closed", "the server closed the connection")
        return header, payload

    async def close(self) -> None:
        self._task.cancel()
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


# --------------------------------------------------------------------------------------
# A hospital's kit and commands


@dataclass
class Kit:
    """The connection settings of a hospital.toml (QUICKSTART section 3)."""

    host: str
    port: int
    cert: Path
    key: Path
    ca: Path
    crl: Path | None
    members: Path | None

    @classmethod
    def load(cls, path: Path) -> Kit:
        data = tomllib.loads(path.read_text())
        base = path.parent

        def opt(k: str) -> Path | None:
            return base / data[k] if k in data else None

        return cls(data["host"], int(data["port"]), base / data["cert"], base / data["key"],
                   base / data["ca"], opt("crl"), opt("members"))

    def identity(self) -> Identity:
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        ca = x509.load_pem_x509_certificate(self.ca.read_bytes())
        key = serialization.load_pem_private_key(self.key.read_bytes(), None)
        ident = Identity(cert_field(cert, NameOID.COMMON_NAME) or "", key,
                         cert.public_bytes(serialization.Encoding.DER), ca)
        if self.crl is not None and self.crl.exists():
            ident.take_crl(x509.load_pem_x509_crl(self.crl.read_bytes()).public_bytes(
                serialization.Encoding.DER))
        if self.members is not None and self.members.exists():
            ident.take_members(self.members.read_bytes())
        return ident

    async def connect(self, identity: Identity | None = None) -> tuple[Connection, dict]:
        """Open, check the server, say hello; return the connection and `welcome`."""
        conn = await Connection.open(self.host, self.port, cert=self.cert, key=self.key,
                                     ca=self.ca, identity=identity)
        welcome, _ = await conn.request("hello", protocol=PROTOCOL)
        if identity is not None:
            if welcome.get("crl"):
                identity.take_crl(unb64(welcome["crl"]))
                if identity.revoked(x509.load_der_x509_certificate(conn.server_cert_der)):
                    await conn.close()
                    raise ClientError("crypto", "the server's certificate is revoked")
            if welcome.get("members"):
                identity.take_members(unb64(welcome["members"]))
        return conn, welcome


@dataclass
class GlobalModel:
    version: int
    sha256: bytes
    weights: np.ndarray
    header: dict


async def fetch_global(conn: Connection) -> GlobalModel:
    """`get_global`, refused unless the payload's SHA-256 is the announced one."""
    header, payload = await conn.request("get_global")
    digest = sha256(payload)
    if digest.hex() != header["sha256"]:
        raise ClientError("crypto", "the downloaded model's sha256 is not the announced one")
    spec = header["array"]
    if spec["dtype"] != "<f4" or len(spec["shape"]) != 1:
        raise ClientError("data", f"the global model is {spec}, not a <f4 vector")
    return GlobalModel(header["version"], digest, array_of(header, payload), header)


async def fetch_status(conn: Connection) -> dict:
    header, _ = await conn.request("status")
    return header


@dataclass
class SendResult:
    version: int
    sha256: str
    round_id: int
    trace: dict


async def _round_push(conn: Connection, want: str, round_id: int, timeout: float) -> dict:
    """The next push of the round; `round_done` with resend ends the round."""
    while True:
        header, _ = await conn.push(timeout)
        kind = header["kind"]
        if kind == "round_done":
            if header["round_id"] != round_id:
                continue  # the end of a round already over for us
            if header.get("resend"):
                raise RoundAbandoned(header.get("code", ""), header.get("message", ""),
                                     header.get("retry_round", 0))
            if want == "round_done":
                return header
            raise RoundRefused("remote-protocol", f"round_done before {want}")
        if kind == "error":
            raise ServerError(header["code"], header["message"], header["rid"])
        if header.get("round_id") != round_id:
            raise RoundRefused("remote-protocol", f"a {kind} push for another round")
        if kind != want:
            raise RoundRefused("remote-protocol", f"a {kind} push while waiting for {want}")
        return header


async def run_round(
    conn: Connection, identity: Identity, base: GlobalModel, update: np.ndarray, samples: int,
    *, policy: Policy | None = None, rng: Randomness | None = None, timeout: float = 120.0,
) -> SendResult:
    """Appendix B steps 4-13 on an open connection, from `join` to `round_done`."""
    rnd = HospitalRound(identity, base_version=base.version, base_sha256=base.sha256,
                        update=update, samples=samples, policy=policy, rng=rng)
    joined, _ = await conn.request("join", base_version=base.version)
    rnd.on_joined(joined)
    rid = rnd.round_id
    adv = rnd.advertise()
    await conn.request("advertise", round_id=rid, **{k: b64(v) for k, v in adv.items()})
    params, people = roster_from_push(await _round_push(conn, "roster", rid, timeout))
    sig = rnd.on_roster(params, people)
    await conn.request("ack_roster", round_id=rid, signature=b64(sig))
    acks = await _round_push(conn, "roster_acks", rid, timeout)
    value = rnd.on_roster_acks(unb64_map(acks["signatures"]))
    await conn.request("reveal_seed", round_id=rid, value=b64(value))
    reveals = await _round_push(conn, "seed_reveals", rid, timeout)
    shared = rnd.on_seed_reveals(unb64_map(reveals["values"]))
    await conn.request("share_keys", round_id=rid, envelopes=b64_map(shared["envelopes"]),
                       digests=b64_map(shared["digests"]), b_commit=b64(shared["b_commit"]))
    env = await _round_push(conn, "envelopes", rid, timeout)
    y = rnd.on_envelopes(env["recipient"], unb64_map(env["envelopes"]),
                         unb64_map(env["digests"]))
    payload = y.astype(rnd.encoding.dtype).tobytes()
    await conn.request("upload_slot", round_id=rid, nbytes=len(payload))
    await conn.request("masked_input", payload, round_id=rid,
                       array={"dtype": rnd.encoding.dtype, "shape": [len(y)]})
    surv = await _round_push(conn, "survivor_list", rid, timeout)
    sig = rnd.on_survivor_list(list(surv["survivors"]))
    await conn.request("sign_survivors", round_id=rid, signature=b64(sig))
    req = await _round_push(conn, "unmask_request", rid, timeout)
    b_out, s_out = rnd.on_unmask_request(list(req["survivors"]), unb64_map(req["signatures"]))
    await conn.request("unmask_response", round_id=rid, b_shares=b64_map(b_out),
                       s_shares=b64_map(s_out))
    done = await _round_push(conn, "round_done", rid, timeout)
    return SendResult(done["version"], done["sha256"], rid, rnd.trace)


async def send_update(
    kit: Kit, update: np.ndarray, samples: int, *, base: GlobalModel | None = None,
    rng: Randomness | None = None, policy: Policy | None = None, timeout: float = 120.0,
) -> SendResult:
    """Connect, download the base model unless given, and run one masked round."""
    identity = kit.identity()
    conn, _ = await kit.connect(identity)
    try:
        if base is None:
            base = await fetch_global(conn)
        return await run_round(conn, identity, base, update, samples, policy=policy, rng=rng,
                               timeout=timeout)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="conformance-client", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, type=Path)
    sub = ap.add_subparsers(dest="action", required=True)
    g = sub.add_parser("get")
    g.add_argument("--out", type=Path, help=".npy to save the weights in")
    sub.add_parser("status")
    s = sub.add_parser("send")
    s.add_argument("--update", required=True, type=Path)
    s.add_argument("--samples", required=True, type=int)
    args = ap.parse_args(argv)
    kit = Kit.load(args.config)

    async def run() -> None:
        if args.action == "send":
            res = await send_update(kit, np.load(args.update), args.samples)
            print(f"round {res.round_id} published version {res.version} ({res.sha256})")
            return
        conn, _ = await kit.connect(kit.identity())
        try:
            if args.action == "status":
                print(json.dumps(await fetch_status(conn)))
            else:
                model = await fetch_global(conn)
                if args.out:
                    np.save(args.out, model.weights)
                print(f"version {model.version}, {len(model.weights)} values, sha256 "
                      f"{model.sha256.hex()}")
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except ClientError as exc:
        print(f"conformance-client: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
