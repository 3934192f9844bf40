"""docs/PROTOCOL.md's test vectors, reproduced by the project's own round code.

The vectors (tests/conformance/vectors.json) were computed by the independent client in
tests/conformance/, written from PROTOCOL.md alone.  Here the same inputs -- certificates,
keys and every random value of spec A.10 -- go into the real ``ClientRound`` and
``ServerRound``; every byte they produce must equal the vector.  A mismatch means the code
and the specification disagree: an independent hospital would fail against us.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from securefl.crypto import pki
from securefl.crypto.keys import advertisement_bytes, roster_statement, survivors_statement
from securefl.crypto.messages import KeyAdvertisement, MaskedInput, ShareKeys
from securefl.crypto.quantize import Encoding
from securefl.crypto.randomness import Randomness
from securefl.crypto.secagg import ClientRound, ServerRound
from securefl.crypto.secagg.common import graph_seed, roster_digest

V = json.loads((Path(__file__).parents[2] / "conformance" / "vectors.json").read_text())
P = V["params"]
H = V["hospitals"]
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)  # inside the vector certificates' validity


class Fixed(Randomness):
    """One hospital's randomness, as the vector lists it."""

    def __init__(self, r: dict) -> None:
        self.r = r

    def x25519_private(self, purpose: str) -> bytes:
        return bytes.fromhex(self.r[f"{purpose}_sk"])

    def graph_value(self) -> bytes:
        return bytes.fromhex(self.r["graph_value"])

    def self_mask_seed(self) -> bytes:
        return bytes.fromhex(self.r["b_u"])

    def coefficients(self, secret: str, count: int) -> list[int]:
        out = [int(c, 16) for c in self.r[f"{secret}_coefficients"]]
        assert len(out) == count
        return out

    def nonce(self, recipient: int) -> bytes:
        return bytes.fromhex(self.r["envelope_nonces"][str(recipient)])


def _hex_map(m: dict) -> dict[int, str]:
    return {int(k): v for k, v in m.items()}


@pytest.fixture(scope="module")
def run() -> dict:
    """The whole round, driven message by message; what each step produced."""
    enc = Encoding(ring_bits=P["ring_bits"], clip=P["clip"], scale=P["scale"],
                   max_clients=P["max_clients"], max_weight=P["max_weight"])
    ca = pki.load_cert(bytes.fromhex(V["ca"]["cert_der"]))
    base_sha = bytes.fromhex(P["base_sha256"])
    server = ServerRound(round_id=P["round_id"], base_version=P["base_version"],
                         vector_len=P["vector_len"], encoding=enc, ca_cert=ca,
                         neighbours=P["neighbours"], threshold=P["threshold"],
                         min_contributors=P["min_contributors"], now=NOW, base_sha256=base_sha)
    clients = []
    for h in H:
        key = ec.derive_private_key(int(h["private_key"], 16), ec.SECP256R1())
        clients.append(ClientRound(
            cert=pki.load_cert(bytes.fromhex(h["cert_der"])), signing_key=key, ca_cert=ca,
            round_id=P["round_id"], base_version=P["base_version"],
            update=np.frombuffer(bytes.fromhex(h["update_f32_hex"]), "<f4").copy(),
            weight=h["samples"], now=NOW, base_sha256=base_sha,
            randomness=Fixed(h["randomness"])))
    out: dict = {"adverts": [], "shares": [], "inputs": [], "unmask": []}
    for h, c in zip(H, clients, strict=True):
        adv = c.advertise()
        out["adverts"].append(adv)
        server.receive(adv, from_name=h["name"])
    roster = server.close_enrolment()
    out["roster"] = roster

    def everyone(msg: object, key: str | None = None) -> None:
        for h, c in zip(H, clients, strict=True):
            ans = c.receive(msg)  # type: ignore[call-overload]
            if key:
                out[key].append(ans)
            server.receive(ans, from_name=h["name"])

    out["acks"] = []
    everyone(roster, "acks")
    everyone(server.close_acks())
    reveals = server.close_reveals()
    out["reveals"] = reveals
    everyone(reveals, "shares")
    bundles = server.close_shares()
    for h, c in zip(H, clients, strict=True):
        y = c.receive(bundles[c.me])
        out["inputs"].append(y)
        server.receive(y, from_name=h["name"])
    listed = server.close_inputs()
    out["listed"] = listed
    out["sigs"] = []
    everyone(listed, "sigs")
    requests = server.close_check()
    for h, c in zip(H, clients, strict=True):
        resp = c.receive(requests[c.me])
        out["unmask"].append(resp)
        server.receive(resp, from_name=h["name"])
    out["result"] = server.finish()
    out["clients"] = clients
    return out


def test_keys_advertisements_and_their_signatures(run: dict) -> None:
    for h, adv in zip(H, run["adverts"], strict=True):
        assert isinstance(adv, KeyAdvertisement)
        assert (adv.c_pk.hex(), adv.s_pk.hex()) == (h["c_pk"], h["s_pk"])
        assert adv.graph_commit.hex() == h["graph_commit"]
        signed = advertisement_bytes(adv.round_id, adv.base_version, adv.name, adv.c_pk,
                                     adv.s_pk, adv.base_sha256, adv.graph_commit)
        assert signed.hex() == h["advertisement"]
        assert adv.signature.hex() == h["advertisement_signature"]  # RFC 6979


def test_roster_digest_statement_acknowledgements_and_graph_seed(run: dict) -> None:
    roster = run["roster"]
    assert [a.name for a in roster.participants] == [h["name"] for h in H]
    digest = roster_digest(roster)
    assert digest.hex() == V["roster_digest"]
    assert roster_statement(P["round_id"], P["base_version"], digest).hex() \
        == V["roster_statement"]
    assert [a.signature.hex() for a in run["acks"]] == [h["roster_ack_signature"] for h in H]
    values = [run["reveals"].values[u] for u in range(1, len(H) + 1)]
    assert graph_seed(roster.config, values).hex() == V["graph_seed"]


def test_envelopes_share_digests_and_self_mask_commitments(run: dict) -> None:
    for h, sk in zip(H, run["shares"], strict=True):
        assert isinstance(sk, ShareKeys)
        assert {v: e.hex() for v, e in sk.envelopes.items()} == {
            v: e["envelope"] for v, e in _hex_map(h["envelopes"]).items()}
        assert {v: d.hex() for v, d in sk.digests.items()} == _hex_map(h["digests"])
        assert sk.b_commit.hex() == h["b_commit"]


def test_masked_inputs_survivor_signatures_and_unmask_shares(run: dict) -> None:
    for h, y in zip(H, run["inputs"], strict=True):
        assert isinstance(y, MaskedInput)
        assert [int(w) for w in y.y] == h["masked_input"]
    assert list(run["listed"].survivors) == V["survivors"]
    digest = roster_digest(run["roster"])
    assert survivors_statement(P["round_id"], P["base_version"], bytes.fromhex(
        P["base_sha256"]), digest, tuple(V["survivors"])).hex() == V["survivor_statement"]
    for h, sig, resp in zip(H, run["sigs"], run["unmask"], strict=True):
        assert sig.signature.hex() == h["survivor_signature"]
        assert {u: s.hex() for u, s in resp.b_shares.items()} == _hex_map(
            h["unmask_response"]["b_shares"])
        assert {u: s.hex() for u, s in resp.s_shares.items()} == _hex_map(
            h["unmask_response"]["s_shares"])


def test_the_unmasked_mean_is_the_vectors_to_the_bit(run: dict) -> None:
    result = run["result"]
    assert result.total_weight == V["result"]["total_weight"]
    assert np.asarray(result.mean_update, "<f4").tobytes().hex() == V["result"]["mean_f32_hex"]
