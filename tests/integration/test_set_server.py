"""Issue 16 item 13: moving the server to another name and port without editing five files.

``securefl certs set-server`` on the operator's machine reissues the server certificate and
rewrites server.toml, admin.toml, federation.json and every kit.  Then a real server process
on the new address and port runs a round with hospitals using their new kits unchanged, and
a server still presenting the old certificate is refused by a hospital connecting to the new
name.  (127.0.0.2 is a loopback address on Linux that the old certificate does not name.)
"""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
from cryptography import x509

from securefl import config
from securefl.cli import main
from securefl.client.session import AdminSession, HospitalSession
from securefl.crypto import pki
from securefl.errors import CertificateRejectedError

from .conftest import Federation, running
from .test_restart import free_port, start_server

D = 1000
NEW_HOST = "127.0.0.2"


def test_set_server_moves_every_file_and_a_round_runs_on_the_new_port(
        fed: Federation, capsys) -> None:
    root = fed.certs.root
    shutil.copy(root / "server.pem", fed.tmp / "old-server.pem")
    shutil.copy(root / "server.key", fed.tmp / "old-server.key")
    port = free_port()
    assert main(["certs", "--dir", str(root), "set-server", "--host", NEW_HOST,
                 "--port", str(port)]) == 0
    said = capsys.readouterr().out
    assert f"server certificate reissued for {NEW_HOST}, port {port}" in said
    assert "kits of a, b, c, d" in said and "give each hospital its new hospital.toml" in said

    cert = pki.load_cert((root / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == [NEW_HOST]
    meta = json.loads((root / "federation.json").read_text())
    assert meta["server_hosts"] == [NEW_HOST] and meta["port"] == port
    server = config.read_toml(root / "server.toml")
    assert (server["host"], server["port"]) == (NEW_HOST, port)
    assert server["hospitals"] == ["a", "b", "c", "d"]  # the rest is kept
    for path in [root / "admin.toml", *(fed.certs.kit(n) / "hospital.toml" for n in "abcd")]:
        data = config.read_toml(path)
        assert (data["host"], data["port"]) == (NEW_HOST, port), path
    assert config.read_toml(fed.certs.kit("a") / "hospital.toml")["ml"]["scans_dir"] == "scans"
    # A kit made from now on names the new server too.
    fed.certs.add_hospital("e")
    assert config.read_toml(fed.certs.kit("e") / "hospital.toml")["port"] == port

    # The server runs from its rewritten server.toml (with a small vector model instead of
    # the CNN, and the three hospitals of this round).
    server.update(model={"params": D, "seed": 0}, hospitals=["a", "b", "c"])
    config.write_toml(root / "server-moved.toml", server)
    proc = start_server(root / "server-moved.toml")

    def kit(name: str) -> config.ClientSettings:  # the new kit as the hospital has it
        path = root / "admin.toml" if name == "admin" else fed.certs.kit(name) / "hospital.toml"
        return config.load(path, config.ClientSettings)

    async def round_on_new_port() -> int:
        async def send(name: str) -> None:
            async with HospitalSession(kit(name)) as h:
                await h.get_global()
                await h.send(np.full(D, 0.01, np.float32), 10)

        sends = [asyncio.create_task(send(n)) for n in "abc"]
        async with AdminSession(kit("admin")) as admin:
            while await admin.count() < 3:
                await asyncio.sleep(0.05)
            version = (await admin.aggregate()).version
        await asyncio.gather(*sends)
        return version

    try:
        assert asyncio.run(round_on_new_port()) == 1
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()

    async def old_certificate() -> None:
        settings = fed.server_settings(host=NEW_HOST, cert=fed.tmp / "old-server.pem",
                                       key=fed.tmp / "old-server.key")
        async with running(settings) as old:
            hospital = kit("a").model_copy(update={"port": old.port})
            with pytest.raises(CertificateRejectedError,
                               match="still presents its certificate from before"):
                async with HospitalSession(hospital):
                    pass

    asyncio.run(old_certificate())


def test_set_server_needs_the_ca_key_and_something_to_change(fed: Federation,
                                                              capsys) -> None:
    root = fed.certs.root
    assert main(["certs", "--dir", str(root), "set-server"]) == 3
    assert "give --host, --port or both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["certs", "--dir", str(root), "set-server", "--port", "70000"])
    assert usage.value.code == 2
    assert "must be a TCP port from 1 to 65535" in capsys.readouterr().err
    (root / "ca.key").unlink()
    before = (root / "server.toml").read_bytes()
    assert main(["certs", "--dir", str(root), "set-server", "--port", "9443"]) == 3
    assert "set-server needs the CA key" in capsys.readouterr().err
    assert (root / "server.toml").read_bytes() == before  # nothing half-done
