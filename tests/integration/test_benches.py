"""The benchmark scripts still run against today's protocol, on small sizes.

Why: docs/PERFORMANCE.md quotes their figures, and a protocol change (a new round step, a
new threshold) used to break them silently until someone re-measured.  Outcomes only, no
timing: the secure and plain rounds both publish, the ratio is printed from the two, and
every byte count holds the model at 4 bytes per parameter plus the keys.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, check=True, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300).stdout
    return out.strip().splitlines()


def test_round_bench_prints_its_layout_and_both_rounds_side_by_side() -> None:
    lines = _run("bench/round_bench.py", "--clients", "3", "--params", "2000",
                 "--repeats", "1")
    assert lines[0].startswith("layout: server in 1 process; hospitals in 1 process(es)")
    row = json.loads(lines[-1])
    assert row["clients"] == 3 and row["repeats"] == 1
    assert row["round_s"] > 0 and row["plain_round_s"] > 0
    # the ratio of the unrounded medians; the printed times are rounded to milliseconds
    assert row["secure_over_plain"] == pytest.approx(row["round_s"] / row["plain_round_s"],
                                                     rel=0.2)
    assert 4 * 2000 < row["upload_bytes"] < 4 * 2000 + 10_000
    assert any(line.startswith("N=3 D=2000: secure ") and "secure/plain" in line
               for line in lines)


def test_graph_params_bench_times_what_the_unit_tests_no_longer_time() -> None:
    lines = _run("bench/graph_params_bench.py")
    row = json.loads(lines[-1])
    assert set(row) >= {"choose_100", "choose_1000", "choose_100000",
                        "harary_1000000_0.3_0.3", "monte_carlo_100x300"}
    assert all(v >= 0 for v in row.values())
    assert lines[0].startswith("choose_100 ") and "target < 0.05 s:" in lines[0]


def test_secagg_bench_counts_every_byte_and_says_why_a_configuration_is_refused() -> None:
    lines = _run("bench/secagg_bench.py", "--clients", "5", "12", "--params", "3000",
                 "--dropout", "0.3")
    rows = {r["clients"]: r for r in map(json.loads, lines[-2:])}
    # N = 5, 2 lost: 3 left, below t = 4 for one assumed colluder.
    assert "at least 4" in rows[5]["refused"]
    ok = rows[12]
    assert ok["colluders"] == 1 and ok["upload_bytes"] == 4 * 3001
    # keys, envelopes, a signature and shares: O(n) bytes on top of the masked input
    assert 0 < ok["extra_bytes"] < 12 * 1000
    assert ok["sent_bytes"] == 4 * 3000 + ok["extra_bytes"]


def test_secagg_bench_sizes_secagg_plus_by_the_analysis_and_compares_it_with_the_full_graph(
) -> None:
    lines = _run("bench/secagg_bench.py", "--clients", "20", "--params", "3000",
                 "--dropout", "0.1", "0.15", "--compare")
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    full, sparse, full_15, refused = rows
    # choose_graph(20, 0.05, 0.1, c=1): k = 8, t = 6, read from the roster the server sent
    assert (full["sparse"], full["neighbours"], full["threshold"]) == (False, 19, 11)
    assert (sparse["sparse"], sparse["neighbours"], sparse["threshold"]) == (True, 8, 6)
    # 2 of 20 lost is exactly the hospitals' cap, ceil(0.1 * 20): the list is signed
    assert sparse["dropped"] == sparse["dropout_cap"] == 2
    assert sparse["extra_bytes"] < full["extra_bytes"]
    assert sparse["full_over_sparse"]["server_s"] == pytest.approx(
        full["server_s"] / sparse["server_s"], rel=0.05)
    assert any("full / sparse: client_s" in line for line in lines)
    # 3 of 20 lost is one more than a sparse round allows: refused, with the reason, while
    # the full graph (no dropout cap) still runs
    assert full_15["dropped"] == 3 and "refused" not in full_15
    assert refused["graph"] == "sparse"
    assert "more than the 2 this sparse round was sized for" in refused["refused"]


def test_conn_churn_bench_prints_the_server_memory_before_and_after() -> None:
    lines = _run("bench/conn_churn_bench.py", "--connections", "300", "--settle", "0.5")
    row = json.loads(lines[-1])
    assert row["connections"] == 300 and row["idle_rss_bytes"] > 0
    assert row["after_over_idle"] == pytest.approx(
        row["after_rss_bytes"] / row["idle_rss_bytes"], abs=0.001)
    assert lines[-2].startswith("300 unauthenticated connections in ")
    assert "target within x1.20" in lines[-2]
    # refusals before a certificate are summarised: a few lines, not one per connection
    assert row["audit_log_bytes"] < 300 * 50


def test_unattended_bench_publishes_with_nobody_acting_and_counts_what_a_person_did(
        tmp_path: Path) -> None:
    lines = _run("bench/unattended_bench.py", "--hospitals", "2", "--rounds", "2",
                 "--image-size", "32", "--train-images", "70", "--test-images", "8",
                 "--keep", str(tmp_path / "fed"))
    row = json.loads(lines[-1])
    assert set(row) == {"rounds_published", "wall_s", "final_global_acc", "person_actions"}
    assert row["rounds_published"] == 2 and row["person_actions"] == 0
    assert row["wall_s"] > 0 and 0 <= row["final_global_acc"] <= 1
    assert any("version 2 published" in line for line in lines)
    # The count comes from the evidence, so a person's doing would show.
    import importlib.util

    spec = importlib.util.spec_from_file_location("unattended_bench",
                                                  ROOT / "bench" / "unattended_bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    audit = tmp_path / "fed" / "server" / "audit.jsonl"
    log = tmp_path / "fed" / "hospitals" / "hospital_1" / "agent.log"
    assert bench.person_actions(audit, [log]) == 0
    with audit.open("a") as fh:
        fh.write(json.dumps({"event": "connected", "name": "admin", "role": "admin"}) + "\n")
    with log.open("a") as fh:
        # as an agent writes it outside systemd's journal: local time first
        fh.write("2026-12-01 10:00:00 agent: round 3: approved over the local socket\n")
    assert bench.person_actions(audit, [log]) == 2
