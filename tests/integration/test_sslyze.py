"""The server's TLS judged from outside by sslyze, as an auditor would run it.

sslyze lives in its own virtual environment (``.venv-sslyze``, built by ``make test``)
because it pins an older ``cryptography`` than securefl uses.  Its exit code is 0 even when
a scan is discarded, so every assertion reads ``scan_status`` from its JSON report.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .conftest import Federation
from .test_restart import free_port, start_server

SSLYZE = Path(__file__).resolve().parents[2] / ".venv-sslyze" / "bin" / "python"
TLS13_AEAD = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
OLDER = ["ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites",
         "tls_1_1_cipher_suites", "tls_1_2_cipher_suites"]


def _scan(port: int, out: Path, *extra: str) -> dict:
    assert SSLYZE.is_file(), "sslyze's environment is missing: run `make test`, which builds it"
    subprocess.run([str(SSLYZE), "-m", "sslyze", "--quiet", "--json_out", str(out),
                    "--mozilla_config", "disable", *extra, f"127.0.0.1:{port}"],
                   capture_output=True, text=True, timeout=180, check=True)
    results = json.loads(out.read_text())["server_scan_results"]
    assert len(results) == 1
    return results[0]


def test_sslyze_sees_only_tls13_aead_suites_and_modern_groups(fed: Federation,
                                                              tmp_path: Path) -> None:
    port = free_port()
    proc = start_server(fed.server_toml(port))
    kit = fed.certs.kit("a")
    try:
        scan = _scan(port, tmp_path / "with-cert.json", "--cert", str(kit / "hospital.pem"),
                     "--key", str(kit / "hospital.key"), "--tlsv1_3", "--tlsv1_2", "--tlsv1_1",
                     "--tlsv1", "--sslv3", "--sslv2", "--elliptic_curves")
        assert scan["scan_status"] == "COMPLETED", scan.get("connectivity_error_trace")
        assert scan["connectivity_result"]["highest_tls_version_supported"] == "TLS_1_3"
        results = scan["scan_result"]
        tls13 = results["tls_1_3_cipher_suites"]
        assert tls13["status"] == "COMPLETED"
        accepted = {c["cipher_suite"]["name"] for c in tls13["result"]["accepted_cipher_suites"]}
        assert accepted == TLS13_AEAD
        for name in OLDER:
            assert results[name]["status"] == "COMPLETED", name
            assert results[name]["result"]["accepted_cipher_suites"] == [], name
        curves = results["elliptic_curves"]
        assert curves["status"] == "COMPLETED"
        supported = {c["name"] for c in curves["result"]["supported_curves"]}
        assert supported == {"X25519", "secp256r1", "secp384r1"}
        rejected = {c["name"] for c in curves["result"]["rejected_curves"]}
        assert {"X448", "secp521r1"} <= rejected

        bare = _scan(port, tmp_path / "no-cert.json", "--tlsv1_3")
        assert bare["scan_status"] == "ERROR_NO_CONNECTIVITY"
        assert bare["scan_result"] is None  # nothing was learnt without a certificate
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
