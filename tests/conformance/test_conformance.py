"""The independent client (written from docs/PROTOCOL.md alone) against the real server.

A federation is made with `securefl certs init`, a real `securefl server` runs as a
subprocess, two hospitals use the real `securefl client ... send` and the third is
tests/conformance/client.py; the outcome checked is the published model.  The vectors
tests check that vectors.json is what the client computes and that it unmasks.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from tests.conformance import client as sfl
from tests.conformance import vectors

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["alpha", "bravo", "charlie"]  # alpha, bravo: the real CLI; charlie: our client
PARAMS = 64

SERVER_TABLES = {
    "model": {"seed": 0, "params": PARAMS},
    "round": {"min_clients": 3, "enrolment_timeout": 30.0, "step_timeout": 20.0,
              "colluders": 1},
    "server_opt": {"kind": "fedavg", "server_lr": 1.0},
}


def securefl_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "securefl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "securefl"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH", "")]))
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Federation:
    root: Path
    certs: Path
    port: int

    def kit(self, name: str) -> Path:
        return self.certs / "kits" / name / "hospital.toml"

    @property
    def admin(self) -> Path:
        return self.certs / "admin.toml"


def cut_from(path: Path, table: str, tail: dict | None = None) -> None:
    """Drop ``table`` and every table after it (in file order), then add ``tail``."""
    data = tomllib.loads(path.read_text())
    assert table in data, f"{path} has no [{table}] table: `certs init` changed its output"
    keys = list(data)
    kept = {k: data[k] for k in keys[: keys.index(table)]}
    path.write_text(tomli_w.dumps({**kept, **(tail or {})}))


async def wait_until_serving(kit: sfl.Kit, proc: subprocess.Popen, deadline: float) -> None:
    while True:
        try:
            conn, _ = await kit.connect()
            await conn.close()
            return
        except (OSError, sfl.ClientError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    certs = root / "certs"
    port = free_port()
    subprocess.run(
        [*securefl_cmd(), "certs", "--dir", str(certs), "init", "--server-host", "127.0.0.1",
         "--port", str(port), "--hospitals", ",".join(NAMES)],
        check=True, env=env(), capture_output=True, timeout=60,
    )
    # QUICKSTART: `[model] params = N` makes version 0 a seeded random vector (no
    # TensorFlow); kits without an [ml] table send with `--update`; fedavg: w += mean.
    cut_from(certs / "server.toml", "model", SERVER_TABLES)
    for name in NAMES:
        cut_from(certs / "kits" / name / "hospital.toml", "ml")
    fed = Federation(root, certs, port)
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([*securefl_cmd(), "server", "--config", str(certs / "server.toml")],
                            env=env(), stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        asyncio.run(wait_until_serving(sfl.Kit.load(fed.kit("charlie")), proc,
                                       time.monotonic() + 30))
        yield fed
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def run_cli(*args: str, timeout: float = 90) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *securefl_cmd(), *args, env=env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode()


# --------------------------------------------------------------------------------------
# hello / status / get


def test_hello_status_and_get_round_trip_with_the_sha256_checked(federation):
    async def go() -> None:
        kit = sfl.Kit.load(federation.kit("charlie"))
        conn, welcome = await kit.connect(kit.identity())
        try:
            assert welcome["kind"] == "welcome" and welcome["rid"] == 1
            assert (welcome["name"], welcome["role"], welcome["protocol"]) == \
                ("charlie", "hospital", 4)
            status = await sfl.fetch_status(conn)
            assert status["kind"] == "status_reply" and "charlie" in status["online"]
            model = await sfl.fetch_global(conn)
        finally:
            await conn.close()
        assert model.version == welcome["version"] == status["version"]
        assert model.weights.shape == (PARAMS,) and model.weights.dtype == np.float32
        # the real CLI downloads the same bytes
        rc, out = await run_cli("client", "--config", str(federation.kit("alpha")), "get")
        assert rc == 0, out
        state = federation.kit("alpha").parent / "state"
        assert np.array_equal(np.load(state / "global.npy"), model.weights)
        assert json.loads((state / "global.json").read_text())["sha256"] == model.sha256.hex()

    asyncio.run(go())


def test_a_model_whose_bytes_do_not_match_its_sha256_is_refused():
    class Tampering:
        async def request(self, kind: str, **fields):
            weights = np.arange(4, dtype="<f4").tobytes()
            header = {"kind": "global_model", "rid": 1, "version": 3,
                      "sha256": sfl.sha256(weights + b"x").hex(),
                      "array": {"dtype": "<f4", "shape": [4]}}
            return header, weights

    with pytest.raises(sfl.ClientError, match="sha256"):
        asyncio.run(sfl.fetch_global(Tampering()))


def test_bad_requests_get_an_error_with_their_rid_and_the_connection_lives(federation):
    async def go() -> None:
        kit = sfl.Kit.load(federation.kit("charlie"))
        conn, welcome = await kit.connect(kit.identity())
        try:
            bad = [
                ({"kind": "join", "rid": 41, "base_version": "0"}, b"", "bad-message"),
                ({"kind": "status", "rid": 42, "colour": "blue"}, b"", "bad-message"),
                ({"kind": "no-such-kind", "rid": 43}, b"", "bad-message"),
                ({"kind": "hello", "rid": 44, "protocol": 4}, b"unexpected", "bad-message"),
                ({"kind": "hello", "rid": 45, "protocol": 3}, b"", "unsupported-protocol"),
                ({"kind": "admin", "rid": 46, "action": "version"}, b"", "forbidden"),
            ]
            for header, payload, code in bad:
                reply, _ = await conn.exchange(header, payload)
                assert (reply["kind"], reply["rid"], reply["code"]) == \
                    ("error", header["rid"], code), reply
                assert reply["message"]
            reply, _ = await conn.exchange({"kind": "join", "rid": 47, "base_version": 999})
            assert (reply["kind"], reply["rid"], reply["code"]) == \
                ("error", 47, "stale-version"), reply
            assert reply["version"] == welcome["version"]
            reply, _ = await conn.exchange(
                {"kind": "masked_input", "rid": 49, "round_id": 1,
                 "array": {"dtype": "<u4", "shape": [3]}}, b"12345")
            assert (reply["kind"], reply["rid"], reply["code"]) == ("error", 49, "bad-shape")
            # section 3: no usable rid (0, or outside u32) -> the error carries rid 0
            for header in ({"kind": "status", "rid": 0}, {"kind": "status", "rid": 2**32}):
                await conn.send(header)
                reply, _ = await conn.push(10)
                assert (reply["kind"], reply["rid"], reply["code"]) == ("error", 0, "bad-message")
            status, _ = await conn.exchange({"kind": "status", "rid": 50})
            assert (status["kind"], status["rid"]) == ("status_reply", 50)
            # section 2: an unknown frame type gets malformed-frame (rid 0), then the close
            head = b'{"kind":"status","rid":51}'
            conn.writer.write(struct.pack(">IBI", 5 + len(head), 2, len(head)) + head)
            await conn.writer.drain()
            reply, _ = await conn.push(10)
            assert (reply["kind"], reply["rid"], reply["code"]) == ("error", 0, "malformed-frame")
            with pytest.raises(sfl.ClientError, match="closed"):
                await conn.push(10)
        finally:
            await conn.close()

    asyncio.run(go())


# --------------------------------------------------------------------------------------
# A masked round: two real CLI hospitals and ours


async def wait_collected(kit: sfl.Kit, want: int, ours: asyncio.Task, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    conn, _ = await kit.connect()
    try:
        while True:
            if ours.done():
                ours.result()  # raises what went wrong
                raise AssertionError("our client finished before the round was aggregated")
            status = await sfl.fetch_status(conn)
            if status["collected"] >= want:
                return
            assert time.monotonic() < deadline, f"masked inputs never all arrived: {status}"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


def test_a_round_with_two_cli_hospitals_and_ours_publishes_the_weighted_mean(federation):
    samples = {"alpha": 120, "bravo": 250, "charlie": 330}
    rng = np.random.default_rng(7)
    updates = {name: (rng.standard_normal(PARAMS) * 0.05).astype(np.float32) for name in NAMES}
    updates["charlie"][0] = 1.5  # beyond clip = 1.0: A.4 clips it to 1.0
    updates["charlie"][1] = -2.0

    async def go() -> tuple[sfl.GlobalModel, sfl.GlobalModel, sfl.SendResult, dict]:
        for name in ("alpha", "bravo"):
            rc, out = await run_cli("client", "--config", str(federation.kit(name)), "get")
            assert rc == 0, out
        kit = sfl.Kit.load(federation.kit("charlie"))
        identity = kit.identity()
        conn, _ = await kit.connect(identity)
        try:
            base = await sfl.fetch_global(conn)
            clis = {}
            for name in ("alpha", "bravo"):
                path = federation.root / f"update_{name}.npy"
                np.save(path, updates[name])
                clis[name] = asyncio.create_task(run_cli(
                    "client", "--config", str(federation.kit(name)), "send", "--update",
                    str(path), "--samples", str(samples[name])))
            ours = asyncio.create_task(sfl.run_round(
                conn, identity, base, updates["charlie"], samples["charlie"], timeout=60))
            await wait_collected(kit, 3, ours, timeout=60)
            rc, out = await run_cli("admin", "--config", str(federation.admin), "aggregate")
            assert rc == 0, out
            result = await asyncio.wait_for(ours, 60)
            cli_out = {name: await task for name, task in clis.items()}
        finally:
            await conn.close()
        conn, _ = await kit.connect(identity)
        try:
            new = await sfl.fetch_global(conn)
        finally:
            await conn.close()
        return base, new, result, cli_out

    base, new, result, cli_out = asyncio.run(go())
    for name, (rc, out) in cli_out.items():
        assert rc == 0 and f"published global version {new.version}" in out, (name, out)
    assert (new.version, new.sha256.hex()) == (result.version, result.sha256)
    assert new.version == base.version + 1
    assert new.header["contributors"] == 3
    assert new.header["total_samples"] == sum(samples.values())
    # QUICKSTART: state/sent/ keeps each update exactly as it was handed to a round
    for name in ("alpha", "bravo"):
        sent = sorted((federation.kit(name).parent / "state" / "sent").glob("*.npy"))
        assert len(sent) == 1, sent
        assert np.array_equal(np.load(sent[0]), updates[name])
    clip, scale = 1.0, 2048.0
    total = sum(samples.values())
    expected = sum(samples[n] * np.clip(updates[n].astype(np.float64), -clip, clip)
                   for n in NAMES) / total
    got = new.weights.astype(np.float64) - base.weights.astype(np.float64)
    # A.4's bound on the mean, plus the float32 rounding of base + mean on the server
    bound = 3 / (2 * scale * total) + clip * 2.0**-23 \
        + np.abs(new.weights.astype(np.float64)) * 2.0**-24
    assert np.all(np.abs(got - expected) <= bound), np.max(np.abs(got - expected) - bound)
    # without our clipped contribution the result would be far off
    others = sum(samples[n] * updates[n].astype(np.float64) for n in ("alpha", "bravo")) / total
    assert np.max(np.abs(got - others)) > 0.1


# --------------------------------------------------------------------------------------
# Test vectors


def test_the_stored_vectors_are_what_the_client_computes():
    assert vectors.VECTORS.read_text() == vectors.render(vectors.compute_vectors())


def test_the_vectors_unmask_to_the_weighted_mean():
    doc = json.loads(vectors.VECTORS.read_text())
    prm = doc["params"]
    enc = sfl.Encoding(prm["ring_bits"], prm["clip"], prm["scale"], prm["max_clients"],
                       prm["max_weight"])
    params = sfl.RosterParams(prm["round_id"], prm["base_version"], prm["vector_len"],
                              prm["threshold"], prm["neighbours"], prm["min_contributors"], enc)
    hs = doc["hospitals"]
    h = bytes.fromhex
    people = [sfl.Participant(x["name"], h(x["c_pk"]), h(x["s_pk"]), h(x["cert_der"]),
                              h(x["advertisement_signature"]), h(prm["base_sha256"]),
                              h(x["graph_commit"])) for x in hs]
    assert sfl.roster_digest(params, people).hex() == doc["roster_digest"]
    ctx = sfl.round_context(prm["round_id"], prm["base_version"])
    for x in hs:
        u = x["number"]
        cert = sfl.x509.load_der_x509_certificate(h(x["cert_der"]))
        assert sfl.verify(cert, h(x["advertisement_signature"]), h(x["advertisement"]))
        assert sfl.verify(cert, h(x["roster_ack_signature"]), h(doc["roster_statement"]))
        assert sfl.verify(cert, h(x["survivor_signature"]), h(doc["survivor_statement"]))
        assert sfl.prg(h(x["self_mask_seed"]), 4, enc.ring_bits).tolist() == \
            x["self_mask_first4"]
        for v, e in x["envelopes"].items():
            b_share, s_share = sfl.open_envelope(h(e["key"]), h(e["envelope"]),
                                                 prm["round_id"], prm["base_version"], u, int(v))
            assert (b_share.hex(), s_share.hex()) == \
                (x["shares"][v]["b"], x["shares"][v]["s"])
            assert sfl.share_digest("b", ctx, u, int(v), b_share) + \
                sfl.share_digest("s", ctx, u, int(v), s_share) == h(x["digests"][v])
        b_u = sfl.shamir_reconstruct(
            {int(k): sfl.share_value(h(s["b"])) for k, s in x["shares"].items()},
            prm["threshold"])
        assert b_u.hex() == x["randomness"]["b_u"]
        assert sfl.b_commitment(ctx, u, b_u).hex() == x["b_commit"]
    nonces = [n for x in hs for n in x["randomness"]["envelope_nonces"].values()]
    assert len(set(nonces)) == len(nonces)
    masked = {x["number"]: np.array(x["masked_input"], dtype=np.uint32) for x in hs}
    total = sfl.unmask_sum(
        params, people, masked, [x["number"] for x in hs],
        {x["number"]: {int(k): h(s) for k, s in x["unmask_response"]["b_shares"].items()}
         for x in hs},
        {x["number"]: {int(k): h(s) for k, s in x["unmask_response"]["s_shares"].items()}
         for x in hs},
    )
    assert total.tolist() == doc["result"]["sum"]
    assert total.tolist() == np.sum([x["encoded"] for x in hs], axis=0).astype(np.uint32).tolist()
    mean, weight = enc.decode(total)
    assert weight == sum(x["samples"] for x in hs) == doc["result"]["total_weight"]
    assert mean.tolist() == doc["result"]["mean"]
    expected = np.array(doc["result"]["weighted_mean_f64"])
    assert np.all(np.abs(mean - expected) <= enc.error_bound(len(hs), weight))


def test_vectors_py_rewrites_identical_bytes(tmp_path, monkeypatch):
    target = tmp_path / "vectors.json"
    monkeypatch.setattr(vectors, "VECTORS", target)
    vectors.main()
    first = target.read_bytes()
    vectors.main()
    assert target.read_bytes() == first == vectors.VECTORS.read_bytes()
    assert first == (Path(vectors.__file__).parent / "vectors.json").read_bytes()
