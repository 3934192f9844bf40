"""Round benchmark: N hospitals against the real server over TLS on loopback.

    python bench/round_bench.py --clients 10 --params 1000000
    python bench/round_bench.py --clients 3,10,30 --params 1000000

Process layout (printed first): the server runs in its own process (as in production; its
memory is read from /proc); the hospitals are asyncio clients in one more process
(``--procs`` spreads them over more), each with its own TLS connection; the admin polls and
aggregates from this process.  Each hospital session hands its round's crypto (checking the
others' keys, masking, signing, unmasking) to a worker thread, as ``HospitalSession`` does by
default, so its event loop keeps the sockets moving meanwhile; the hospitals of one process
share ``--workers`` such threads (default 1: their crypto runs one at a time, as on one
core).  ``--workers 0`` runs the crypto on the event loop instead, which stalls every other
hospital's upload in that process while one masks.

For each configuration the same round runs with secure aggregation and with
``masking = "plain"`` (same transport, framing, encoding and store, no masks), ``--repeats``
(3) times each, interleaved, each on a fresh server: times are medians, memory the worst
run.  Timing runs from the first join to the published version (``aggregate`` returning);
downloads of the global model happen before it.  ``server_peak_rss_bytes`` is the server's
peak resident set during the secure round (the kernel's high-water mark is reset just
before it); ``upload_bytes`` is what one hospital wrote during its round (frame bytes; TLS
adds ~0.1%); ``server_cpu_s`` and ``hospitals_cpu_s`` are the CPU seconds the server's and
the hospitals' processes used during the timed round (with ``plain_`` the same for the
plain round): on two cores they say which side a round waits for.  Prints one readable line
per configuration (secure, plain and their ratio), then, last, one JSON line per
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from securefl import config
from securefl.certs import CertDir
from securefl.client.session import AdminSession, HospitalSession


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _server_toml(certs: Path, store: Path, n: int, params: int, masking: str) -> Path:
    names = [f"h{i:03d}" for i in range(n)]
    return config.write_toml(certs / f"server-{masking}.toml", {
        "host": "127.0.0.1", "port": 0,
        "cert": "server.pem", "key": "server.key", "ca": "ca.pem", "crl": "crl.pem",
        "members": "members.json",
        "store_dir": store, "audit_log": store / "audit.jsonl", "hospitals": names,
        "round": {"masking": masking, "max_clients": max(n, 2), "step_timeout": 120},
        "model": {"params": params},
    })


def _start_server(path: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "securefl", "server", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("securefl server listening on"):
            return proc, int(line.rsplit(":", 1)[1])
    raise RuntimeError(f"server did not start (exit {proc.wait()})")


def _settings(certs_root: Path, name: str, port: int) -> config.ClientSettings:
    certs = CertDir(certs_root)
    path = certs.root / "admin.toml" if name == "admin" else certs.kit(name) / "hospital.toml"
    s = config.load(path, config.ClientSettings)
    # The unmasked baseline run needs hospitals that accept it (they refuse by default).
    return s.model_copy(update={"host": "127.0.0.1", "port": port,
                                "policy": config.HospitalPolicy(allow_unmasked=True)})


def _hospitals(certs_root: Path, names: list[str], first: int, params: int, port: int,
               workers: int, ready: Any, go: Any, results: Any) -> None:
    """One hospitals' process: connect and download, say ready, send when told."""

    async def main() -> None:
        if workers:
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(workers))
        sessions = [await HospitalSession(_settings(certs_root, n, port), offload=workers > 0)
                    .connect() for n in names]
        updates = [np.random.default_rng(first + i).normal(0, 0.01, params).astype(np.float32)
                   for i in range(len(names))]
        for s in sessions:
            await s.get_global()
        before = [s.conn.bytes_sent for s in sessions]
        ready.put(len(names))
        await asyncio.to_thread(go.wait)
        cpu = time.process_time()
        await asyncio.gather(*(s.send(u, 100) for s, u in zip(sessions, updates, strict=True)))
        results.put((sessions[0].conn.bytes_sent - before[0], time.process_time() - cpu))
        for s in sessions:
            await s.close()

    asyncio.run(main())


def _one_round(certs: CertDir, n: int, params: int, port: int, pid: int, procs: int,
               workers: int) -> dict:
    names = [f"h{i:03d}" for i in range(n)]
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    groups = [names[i::procs] for i in range(procs)]
    children = [ctx.Process(target=_hospitals, args=(certs.root, g, i * n, params, port,
                                                     workers, ready, go, results))
                for i, g in enumerate(groups)]
    for w in children:
        w.start()
    for _ in children:
        ready.get(timeout=300)

    async def admin_side() -> tuple[float, int, int, float]:
        admin = await AdminSession(_settings(certs.root, "admin", port)).connect()
        idle_rss = _proc_kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak to now
        cpu = _cpu_s(pid)
        t0 = time.perf_counter()
        go.set()
        while await admin.count() < n:
            await asyncio.sleep(0.005)
        result = await admin.aggregate()
        round_s = time.perf_counter() - t0
        server_cpu = _cpu_s(pid) - cpu
        assert result.contributors == n
        await admin.close()
        return round_s, idle_rss, _proc_kb(pid, "VmHWM"), server_cpu

    round_s, idle_rss, peak, server_cpu = asyncio.run(admin_side())
    per_process = [results.get(timeout=300) for _ in children]
    for w in children:
        w.join(timeout=300)
    return {"round_s": round_s, "idle_rss": idle_rss, "peak_rss": peak,
            "upload": per_process[0][0], "server_cpu_s": server_cpu,
            "hospitals_cpu_s": sum(cpu for _, cpu in per_process)}


def _run(certs: CertDir, tmp: Path, n: int, params: int, procs: int, workers: int,
         masking: str, rep: int) -> dict:
    path = _server_toml(certs.root, tmp / f"store-{masking}-{rep}", n, params, masking)
    proc, port = _start_server(path)
    try:
        return _one_round(certs, n, params, port, proc.pid, procs, workers)
    finally:
        proc.terminate()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def run_config(n: int, params: int, procs: int, repeats: int = 3, workers: int = 1) -> dict:
    """Secure and plain rounds interleaved ``repeats`` times, each on a fresh server: the
    times are medians (a plain round is short, so one noisy run moved the ratio by 0.5),
    the memory growth is the largest seen."""
    tmp = Path(tempfile.mkdtemp(prefix="securefl-bench-"))
    try:
        certs = CertDir(tmp / "certs")
        certs.init(["127.0.0.1"], [f"h{i:03d}" for i in range(n)])
        runs: dict[str, list[dict]] = {"secagg": [], "plain": []}
        load_before = os.getloadavg()[0]
        for rep in range(repeats):
            for masking in runs:
                runs[masking].append(_run(certs, tmp, n, params, procs, workers, masking, rep))
        secure, plain = runs["secagg"], runs["plain"]
        model_bytes = params * 4
        worst = max(secure, key=lambda r: r["peak_rss"] - r["idle_rss"])
        round_s = float(np.median([r["round_s"] for r in secure]))
        plain_s = float(np.median([r["round_s"] for r in plain]))
        return {
            "clients": n, "params": params, "client_processes": procs,
            "crypto_threads_per_process": workers, "repeats": repeats,
            "round_s": round(round_s, 3), "plain_round_s": round(plain_s, 3),
            "secure_over_plain": round(round_s / plain_s, 2),
            "round_s_all": [round(r["round_s"], 3) for r in secure],
            # CPU seconds during the timed round (medians): where the two cores went
            "server_cpu_s": round(float(np.median([r["server_cpu_s"] for r in secure])), 3),
            "hospitals_cpu_s": round(float(np.median([r["hospitals_cpu_s"] for r in secure])),
                                     3),
            "plain_server_cpu_s": round(float(np.median([r["server_cpu_s"] for r in plain])),
                                        3),
            "plain_hospitals_cpu_s": round(float(np.median([r["hospitals_cpu_s"]
                                                            for r in plain])), 3),
            "plain_round_s_all": [round(r["round_s"], 3) for r in plain],
            "upload_bytes": secure[0]["upload"],
            "server_idle_rss_bytes": worst["idle_rss"],
            "server_peak_rss_bytes": worst["peak_rss"],
            "model_bytes": model_bytes,
            "rss_growth_over_model": round((worst["peak_rss"] - worst["idle_rss"])
                                           / model_bytes, 2),
            "rss_growth_all": [round((r["peak_rss"] - r["idle_rss"]) / model_bytes, 2)
                               for r in secure],
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def layout(procs: int, workers: int) -> str:
    """The process layout in one sentence (printed, and quoted in docs/PERFORMANCE.md)."""
    crypto = (f"round crypto in {workers} worker thread(s) per process" if workers
              else "round crypto on each process's event loop")
    return (f"layout: server in 1 process; hospitals in {procs} process(es), one TLS "
            f"connection each, {crypto}; admin in this process; {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10", help="hospital counts, comma-separated")
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--procs", type=int, default=1,
                        help="processes the hospitals are spread over (default 1)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker threads for the hospitals' round crypto per process "
                             "(default 1; 0 = on the event loop)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="secure and plain rounds per configuration (medians reported)")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(layout(args.procs, args.workers), flush=True)
    results = []
    for n in args.clients.split(","):
        r = run_config(int(n), args.params, min(args.procs, int(n)), args.repeats, args.workers)
        results.append(r)
        print(f"N={r['clients']} D={r['params']}: secure {r['round_s']:.3f} s, plain "
              f"{r['plain_round_s']:.3f} s, secure/plain {r['secure_over_plain']:.2f} "
              f"(medians of {r['repeats']}; secure {r['round_s_all']}, plain "
              f"{r['plain_round_s_all']}; load {r['load_avg_1min']})", flush=True)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
