"""The server as started by ``securefl server`` offers only X25519, P-256 and P-384.

Python's ``ssl`` cannot choose key-exchange groups; the server applies ``openssl.cnf``
through OPENSSL_CONF before ``ssl`` loads.  Checked from outside with ``openssl s_client``.
"""

from __future__ import annotations

import shutil
import subprocess

from .conftest import Federation
from .test_restart import free_port, start_server

OPENSSL = shutil.which("openssl")  # a required test tool: missing, this test fails (never skips)


def _s_client(fed: Federation, port: int, group: str) -> str:
    kit = fed.certs.kit("a")
    done = subprocess.run(
        [OPENSSL or "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
         "-groups", group,
         "-cert", str(kit / "hospital.pem"), "-key", str(kit / "hospital.key"),
         "-CAfile", str(kit / "ca.pem")],
        input="", capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def test_only_modern_groups_are_offered(fed: Federation) -> None:
    port = free_port()
    proc = start_server(fed.server_toml(port))
    try:
        assert "Server Temp Key: X25519" in _s_client(fed, port, "X25519")
        assert "secp384r1" in _s_client(fed, port, "P-384")
        for weak in ("ffdhe2048", "secp521r1"):
            out = _s_client(fed, port, weak)
            assert "Cipher is (NONE)" in out and "Server Temp Key" not in out
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
