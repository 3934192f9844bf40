"""Test vectors for one fixed masked round, computed by the independent client alone.

Run from the worktree root to rewrite vectors.json (the output is byte-for-byte the same
on every run):

    PYTHONPATH=$PWD .venv/bin/python -m tests.conformance.vectors

Every input is derived from a fixed label (SHA-256/SHA-512 of "securefl conformance
vectors/" + label) and written into the JSON, so a reader never needs this derivation:
the JSON's inputs are the inputs.  The layout is described in "_about" and in README.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conformance.client import (
    Encoding,
    FixedRandomness,
    HospitalRound,
    Identity,
    P,
    Participant,
    RosterParams,
    prg,
    roster_digest_input,
    unmask_sum,
)

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors.json"

NAMES = ["alpha", "bravo", "charlie"]
ROUND_ID = 7
BASE_VERSION = 2
BASE_SHA256 = hashlib.sha256(b"securefl test vector base model").digest()
VECTOR_LEN = 8
THRESHOLD = 3
NEIGHBOURS = 2
MIN_CONTRIBUTORS = 2
SAMPLES = [10, 20, 30]
# The default encoding: the server's joined for a default server.toml, and SECURITY.md's
# "default (32-bit ring, c = 1, 100 hospitals, 10,000 samples each) gives scale = 2048".
ENCODING = Encoding(ring_bits=32, clip=1.0, scale=2048.0, max_clients=100, max_weight=10000)
NOT_BEFORE = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2099, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

ABOUT = {
    "what": "One masked round of securefl protocol 4 (docs/PROTOCOL.md, Appendix A/B), full "
            "graph, no dropouts, computed by tests/conformance/client.py (written from the "
            "document alone).  Regenerate with `python -m tests.conformance.vectors`.",
    "encoding": "all byte strings are lowercase hex; ring elements and mask words are JSON "
                "integers (unsigned, mod 2^ring_bits); participant maps are JSON objects "
                "keyed by the participant number in decimal ('1', '2', '3'); floats are "
                "given both as decimal and as '<f4' little-endian hex (the exact value)",
    "params": "the round: round_id, base_version, base_sha256 (= sha256(b'securefl test "
              "vector base model')), vector_len D, threshold t, neighbours k (= n - 1: full "
              "graph), min_contributors, and the encoding (ring_bits, clip, scale, "
              "max_clients, max_weight) exactly as in `joined` and `roster`",
    "ca": "INPUT. private_key: P-256 scalar (32 bytes big-endian); cert_der: its "
          "self-signed certificate",
    "hospitals[i]": "participant number = i + 1 (names sorted).  INPUTS: name, private_key "
                    "(P-256 scalar of its TLS certificate), cert_der (issued by the CA, "
                    "subject CN = name, OU = hospital), samples n_u, update (float32 Δ), "
                    "randomness (A.10: c_sk, s_sk, graph_value, b_u, b_coefficients and "
                    "s_coefficients a_1..a_{t-1} each as 33-byte big-endian, "
                    "envelope_nonces {recipient: 12 bytes}).  OUTPUTS: c_pk, s_pk, "
                    "graph_commit, advertisement (the signed bytes) and "
                    "advertisement_signature (DER, RFC 6979), roster_ack_signature, "
                    "neighbours N(u), shares (dealt by this hospital: {holder: {b, s}} 33 "
                    "bytes each, holder = x-coordinate), digests {holder: 64 bytes}, b_commit, "
                    "envelopes {recipient: {key k_uv, nonce, plaintext, associated_data, "
                    "envelope (102 bytes)}}, self_mask_seed m_u and self_mask_first4 (first 4 "
                    "ring elements of PRG(m_u)), pair_masks {v: {seed s_uv, sign (+ if v > u, "
                    "- if v < u), first4}}, encoded (the D + 1 ring elements of A.4), "
                    "masked_input y (D + 1 ring elements), survivor_signature, "
                    "unmask_response {b_shares, s_shares} (owner -> 33-byte share, "
                    "x-coordinate = this hospital)",
    "roster_digest_input": "the bytes hashed into roster_digest (A.3)",
    "roster_digest / roster_statement / graph_seed / survivor_statement": "A.3, shared by "
                                                                          "all",
    "survivors": "the survivor list every hospital signs",
    "result": "sum: the unmasked sum of the survivors' encodings (D + 1 ring elements, the "
              "last is the total weight W); mean: the decoded float32 mean (A.4); "
              "weighted_mean_f64: Σ n_u Δ_u / Σ n_u in binary64; error_bound: A.4's bound",
}


def label_bytes(label: str, n: int = 32) -> bytes:
    data = b"securefl conformance vectors/" + label.encode()
    return (hashlib.sha256(data) if n <= 32 else hashlib.sha512(data)).digest()[:n]


def p256_key(label: str) -> ec.EllipticCurvePrivateKey:
    scalar = int.from_bytes(label_bytes(label), "big") % (P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def scalar_hex(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_numbers().private_value.to_bytes(32, "big").hex()


def field_element(label: str) -> int:
    return int.from_bytes(label_bytes(label, 64), "big") % P


def make_ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securefl conformance CA")])
    pub = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(pub).serial_number(1)
        .not_valid_before(NOT_BEFORE).not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    )


def make_hospital_cert(
    name: str, serial: int, key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "hospital"),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(serial).not_valid_before(NOT_BEFORE).not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True)
    )


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def f32_list(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float32)]


def f32_hex(values: np.ndarray) -> str:
    return np.asarray(values, dtype="<f4").tobytes().hex()


def hexmap(values: dict[int, bytes]) -> dict[str, str]:
    return {str(k): v.hex() for k, v in sorted(values.items())}


def ints(values: np.ndarray) -> list[int]:
    return [int(v) for v in values]


def compute_vectors() -> dict[str, Any]:
    """The whole round, with every input fixed; returns the JSON document."""
    n = len(NAMES)
    t = THRESHOLD
    ca_key = p256_key("ca")
    ca = make_ca(ca_key)
    updates = [np.array([0.01 * (i + 1) * (j - 3) for j in range(VECTOR_LEN)], dtype=np.float32)
               for i in range(n)]
    rounds: list[HospitalRound] = []
    inputs: list[dict[str, Any]] = []
    for i, name in enumerate(NAMES):
        me = i + 1
        key = p256_key(f"{name}/key")
        cert = make_hospital_cert(name, 1000 + me, key, ca, ca_key)
        rand = {
            "c_sk": label_bytes(f"{name}/c_sk"),
            "s_sk": label_bytes(f"{name}/s_sk"),
            "graph_value": label_bytes(f"{name}/graph_value"),
            "b_u": label_bytes(f"{name}/b_u"),
            "b_coefficients": [field_element(f"{name}/b_coefficient/{j}") for j in range(1, t)],
            "s_coefficients": [field_element(f"{name}/s_coefficient/{j}") for j in range(1, t)],
            # one nonce per directed pair: u -> v and v -> u share a key, never a nonce
            "envelope_nonces": {v: label_bytes(f"{name}/nonce/{me}->{v}", 12)
                                for v in range(1, n + 1) if v != me},
        }
        ident = Identity(name, key, der(cert), ca)
        rounds.append(HospitalRound(
            ident, base_version=BASE_VERSION, base_sha256=BASE_SHA256, update=updates[i],
            samples=SAMPLES[i], rng=FixedRandomness(**rand),
        ))
        inputs.append({"key": key, "cert": der(cert), "rand": rand})

    joined = {
        "round_id": ROUND_ID, "base_version": BASE_VERSION, "vector_len": VECTOR_LEN,
        "masking": "secagg", "ring_bits": ENCODING.ring_bits, "clip": ENCODING.clip,
        "scale": ENCODING.scale, "max_clients": ENCODING.max_clients,
        "max_weight": ENCODING.max_weight,
    }
    for r in rounds:
        r.on_joined(joined)
    ads = [r.advertise() for r in rounds]
    people = [
        Participant(NAMES[i], a["c_pk"], a["s_pk"], inputs[i]["cert"], a["signature"],
                    a["base_sha256"], a["graph_commit"])
        for i, a in enumerate(ads)
    ]
    params = RosterParams(ROUND_ID, BASE_VERSION, VECTOR_LEN, THRESHOLD, NEIGHBOURS,
                          MIN_CONTRIBUTORS, ENCODING)
    acks = {i + 1: r.on_roster(params, people) for i, r in enumerate(rounds)}
    values = {i + 1: r.on_roster_acks(acks) for i, r in enumerate(rounds)}
    shared = {i + 1: r.on_seed_reveals(values) for i, r in enumerate(rounds)}
    masked = {}
    for v, r in enumerate(rounds, 1):
        env = {u: s["envelopes"][v] for u, s in shared.items() if v in s["envelopes"]}
        dig = {u: s["digests"][v] for u, s in shared.items() if v in s["envelopes"]}
        masked[v] = r.on_envelopes(v, env, dig)
    survivors = sorted(masked)
    sigs = {v: r.on_survivor_list(survivors) for v, r in enumerate(rounds, 1)}
    answers = {v: r.on_unmask_request(survivors, sigs) for v, r in enumerate(rounds, 1)}
    total = unmask_sum(params, people, masked, list(range(1, n + 1)),
                       {v: a[0] for v, a in answers.items()},
                       {v: a[1] for v, a in answers.items()})
    mean, weight = ENCODING.decode(total)
    expected = sum(SAMPLES[i] * updates[i].astype(np.float64) for i in range(n)) / sum(SAMPLES)

    hospitals = []
    for i, r in enumerate(rounds):
        tr, inp, rand = r.trace, inputs[i], inputs[i]["rand"]
        me = i + 1
        hospitals.append({
            "number": me,
            "name": NAMES[i],
            "private_key": scalar_hex(inp["key"]),
            "cert_der": inp["cert"].hex(),
            "samples": SAMPLES[i],
            "update": f32_list(updates[i]),
            "update_f32_hex": f32_hex(updates[i]),
            "randomness": {
                "c_sk": rand["c_sk"].hex(),
                "s_sk": rand["s_sk"].hex(),
                "graph_value": rand["graph_value"].hex(),
                "b_u": rand["b_u"].hex(),
                "b_coefficients": [c.to_bytes(33, "big").hex() for c in rand["b_coefficients"]],
                "s_coefficients": [c.to_bytes(33, "big").hex() for c in rand["s_coefficients"]],
                "envelope_nonces": hexmap(rand["envelope_nonces"]),
            },
            "c_pk": r.c_pk.hex(),
            "s_pk": r.s_pk.hex(),
            "graph_commit": r.graph_commit.hex(),
            "advertisement": tr["advertisement"].hex(),
            "advertisement_signature": tr["advertisement_signature"].hex(),
            "roster_ack_signature": tr["roster_ack_signature"].hex(),
            "neighbours": list(tr["neighbours"]),
            "shares": {str(h): {"b": tr["b_shares"][h].hex(), "s": tr["s_shares"][h].hex()}
                       for h in sorted(tr["b_shares"])},
            "digests": hexmap(tr["digests"]),
            "b_commit": tr["b_commit"].hex(),
            "envelopes": {
                str(v): {
                    "key": tr["envelope_keys"][v].hex(),
                    "nonce": tr["envelope_nonces"][v].hex(),
                    "plaintext": (me.to_bytes(4, "big") + v.to_bytes(4, "big")
                                  + tr["b_shares"][v] + tr["s_shares"][v]).hex(),
                    "associated_data": (b"securefl/v1/envelope\0" + ROUND_ID.to_bytes(8, "big")
                                        + BASE_VERSION.to_bytes(8, "big")
                                        + me.to_bytes(4, "big") + v.to_bytes(4, "big")).hex(),
                    "envelope": tr["envelopes"][v].hex(),
                }
                for v in sorted(tr["envelopes"])
            },
            "self_mask_seed": tr["self_mask_seed"].hex(),
            "self_mask_first4": ints(tr["self_mask"][:4]),
            "pair_masks": {
                str(v): {"seed": pm["seed"].hex(), "sign": pm["sign"],
                         "first4": ints(pm["mask"][:4])}
                for v, pm in sorted(tr["pair_masks"].items())
            },
            "encoded": ints(tr["encoded"]),
            "masked_input": ints(tr["masked_input"]),
            "survivor_signature": tr["survivor_signature"].hex(),
            "unmask_response": {"b_shares": hexmap(tr["unmask_b_shares"]),
                                "s_shares": hexmap(tr["unmask_s_shares"])},
        })
    first = rounds[0].trace
    return {
        "_about": ABOUT,
        "params": {
            "round_id": ROUND_ID, "base_version": BASE_VERSION,
            "base_sha256": BASE_SHA256.hex(), "vector_len": VECTOR_LEN,
            "threshold": THRESHOLD, "neighbours": NEIGHBOURS,
            "min_contributors": MIN_CONTRIBUTORS, "ring_bits": ENCODING.ring_bits,
            "clip": ENCODING.clip, "scale": ENCODING.scale,
            "max_clients": ENCODING.max_clients, "max_weight": ENCODING.max_weight,
            "prg_check": {"seed": bytes(32).hex(),
                          "first4": ints(prg(bytes(32), 4, ENCODING.ring_bits))},
        },
        "ca": {"private_key": scalar_hex(ca_key), "cert_der": der(ca).hex()},
        "hospitals": hospitals,
        "roster_digest_input": roster_digest_input(params, people).hex(),
        "roster_digest": first["roster_digest"].hex(),
        "roster_statement": first["roster_statement"].hex(),
        "graph_seed": first["graph_seed"].hex(),
        "survivors": survivors,
        "survivor_statement": first["survivor_statement"].hex(),
        "result": {
            "sum": ints(total),
            "total_weight": weight,
            "mean": f32_list(mean),
            "mean_f32_hex": f32_hex(mean),
            "weighted_mean_f64": [float(x) for x in expected],
            "error_bound": ENCODING.error_bound(len(survivors), weight),
        },
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=True) + "\n"


def main() -> int:
    VECTORS.write_text(render(compute_vectors()))
    print(f"wrote {VECTORS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
