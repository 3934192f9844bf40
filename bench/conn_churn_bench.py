"""Connection-churn benchmark: the server's memory before and after many connections that
never authenticate.

    python bench/conn_churn_bench.py                       # 10,000 connections
    python bench/conn_churn_bench.py --connections 500

The external probe of issue 14 saw a server grow from ~70 MB to 400-430 MB under
unauthenticated churn and stay there.  This starts a real ``securefl server`` process on
loopback (a 1,000-parameter model, so the model is not what is measured), reads its
resident set (VmRSS, /proc) once it is idle, then opens ``--connections`` connections from
``--sources`` loopback addresses (127.0.0.2, 127.0.0.3, ...), ``--concurrency`` at a time,
each one of: plain TCP that sends a few bytes of garbage and hangs up; TLS without a client
certificate (refused in the handshake); TLS that hangs up halfway through the handshake.  It
reads VmRSS again after a short pause and prints both, their ratio (the target is within
1.2) and the peak (VmHWM); the last line is JSON.  Memory only: it never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from securefl import config
from securefl.certs import CertDir


def _proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _start_server(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    toml = config.write_toml(root / "certs" / "server-churn.toml", {
        "host": "127.0.0.1", "port": 0,
        "cert": "server.pem", "key": "server.key", "ca": "ca.pem", "crl": "crl.pem",
        "members": "members.json", "store_dir": root / "store",
        "audit_log": root / "store" / "audit.jsonl", "hospitals": ["h1"],
        "model": {"params": 1000},
    })
    proc = subprocess.Popen([sys.executable, "-m", "securefl", "server", "--config", str(toml)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("securefl server listening on"):
            # keep reading its log, or a full pipe would stall the server
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, int(line.rsplit(":", 1)[1])
    raise RuntimeError(f"server did not start (exit {proc.wait()})")


async def _churn(port: int, ca: Path, total: int, concurrency: int, sources: int) -> int:
    """Open ``total`` unauthenticated connections; how many the server refused at once."""
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(cafile=str(ca))
    counter = itertools.count()
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        src = (f"127.0.0.{2 + i % sources}", 0)
        kind = i % 3
        try:
            if kind == 1:  # TLS without a client certificate
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=no_cert,
                                                     server_hostname="127.0.0.1",
                                                     local_addr=src)
                w.write(b"\0" * 16)
                await w.drain()
                await asyncio.wait_for(r.read(1), 5)
            else:
                r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=src)
                if kind == 0:  # garbage, then hang up
                    w.write(b"GET / HTTP/1.0\r\n\r\n")
                else:  # the start of a ClientHello, then hang up
                    w.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64))
                await w.drain()
                await asyncio.wait_for(r.read(1), 0.05 if kind == 2 else 5)
            w.close()
        except TimeoutError:
            w.close()
        except (ConnectionError, ssl.SSLError, OSError):
            refused += 1

    async def worker() -> None:
        while (i := next(counter)) < total:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return refused


def run(connections: int, concurrency: int, sources: int, settle: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="securefl-churn-"))
    try:
        certs = CertDir(tmp / "certs")
        certs.init(["127.0.0.1"], ["h1"])
        env = dict(os.environ)
        proc, port = _start_server(tmp, env)
        try:
            time.sleep(settle)
            idle = _proc_kb(proc.pid, "VmRSS")
            started = time.monotonic()
            refused = asyncio.run(_churn(port, certs.ca_cert, connections, concurrency,
                                         sources))
            seconds = time.monotonic() - started
            time.sleep(settle)
            after = _proc_kb(proc.pid, "VmRSS")
            peak = _proc_kb(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(10)
        audit = (tmp / "store" / "audit.jsonl").stat().st_size
        return {"connections": connections, "concurrency": concurrency, "sources": sources,
                "seconds": round(seconds, 1), "refused_or_reset": refused,
                "idle_rss_bytes": idle, "after_rss_bytes": after, "peak_rss_bytes": peak,
                "after_over_idle": round(after / idle, 3), "audit_log_bytes": audit}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sources", type=int, default=8, help="loopback addresses to use")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to wait before each reading")
    a = parser.parse_args()
    row = run(a.connections, a.concurrency, a.sources, a.settle)
    mb = 1 / (1 << 20)
    print(f"{row['connections']} unauthenticated connections in {row['seconds']} s: server "
          f"RSS {row['idle_rss_bytes'] * mb:.1f} MB idle -> {row['after_rss_bytes'] * mb:.1f} MB "
          f"after (x{row['after_over_idle']:.2f}; target within x1.20), peak "
          f"{row['peak_rss_bytes'] * mb:.1f} MB; audit log {row['audit_log_bytes']} bytes")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
