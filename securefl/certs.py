"""Federation certificates on disk: the folder ``securefl certs`` manages, and hospital kits.

``securefl.crypto.pki`` builds certificates in memory; this module is the file layer on top:
where each file lives, private keys written 0600 from the first byte (``os.open`` with the
mode, never chmod after the fact), the certificate revocation list the server loads, and a
self-contained kit folder per hospital to copy to that hospital's machine.

Layout of the certificate folder (everything but README/.gitignore stays out of git)::

    ca.pem ca.key            federation CA (the key signs new certificates and the CRL)
    crl.pem                  revocation list, always present (the server requires one)
    server.pem server.key    server certificate, SANs = hosts given to ``init``
    admin.pem admin.key      the operator's certificate
    members/<name>.pem       every hospital certificate ever issued (revocation needs them)
    kits/<name>/             hospital.pem hospital.key ca.pem hospital.toml
    federation.json          server hosts and port, reused by ``add-hospital`` and ``renew``
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from securefl.crypto import pki
from securefl.errors import ConfigError

# The model every party builds; the server's [model.ml] and each kit's [ml] repeat it.
_MODEL_SPEC = 'image_size = 128\nmodel_kind = "seed"\n'
_HOSPITAL_TAIL = (
    "# Where this hospital keeps the downloaded global model and its round state.\n"
    'state_dir = "state"\n\n'
    "[ml]\n"
    "# This hospital's scans: Training/<class>/*.jpg and Testing/<class>/*.jpg, with the\n"
    "# classes glioma, meningioma, notumor, pituitary.  They never leave this machine.\n"
    'scans_dir = "scans"\n'
    "# The local model (model.keras) and its metrics history.\n"
    'model_dir = "model"\n'
    + _MODEL_SPEC
    + "seed = 0\nepochs = 1\nbatch_size = 32\n"
)

CRL_LIFETIME = dt.timedelta(days=30)
DEFAULT_PORT = 9095


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write a file atomically; private keys are created 0600 so they are never readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    mode = 0o600 if private else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _save(folder: Path, stem: str, cred: pki.Credential) -> None:
    _write(folder / f"{stem}.pem", cred.cert_pem())
    _write(folder / f"{stem}.key", cred.key_pem(), private=True)


def load_credential(cert_path: Path, key_path: Path) -> pki.Credential:
    """Read a certificate and its key, with one clear error when either is missing."""
    try:
        cert = pki.load_cert(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(f"certificate file missing: {exc.filename}") from exc
    except ValueError as exc:
        raise ConfigError(f"{key_path} is not a readable private key") from exc
    return pki.Credential(cert, key)  # type: ignore[arg-type]


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER certificate, as people compare them over the phone."""
    digest = hashlib.sha256(pki.cert_der(cert)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


@dataclass(frozen=True)
class CertDir:
    """One federation's certificate folder."""

    root: Path

    # -- paths -------------------------------------------------------------------------
    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    def member_cert(self, name: str) -> Path:
        return self.root / "members" / f"{pki.check_name(name)}.pem"

    def kit(self, name: str) -> Path:
        return self.root / "kits" / pki.check_name(name)

    def ca(self) -> pki.Credential:
        if not self.ca_cert.exists():
            raise ConfigError(f"no federation CA in {self.root}: run `securefl certs init` first")
        return load_credential(self.ca_cert, self.root / "ca.key")

    def _meta(self) -> dict:
        try:
            return json.loads((self.root / "federation.json").read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{self.root} is not a securefl certificate folder") from exc

    # -- commands ----------------------------------------------------------------------
    def init(
        self,
        server_hosts: list[str],
        hospitals: list[str],
        *,
        port: int = DEFAULT_PORT,
        federation: str = "securefl",
        now: dt.datetime | None = None,
    ) -> None:
        """CA, server, admin, one certificate and kit per hospital, and an empty CRL."""
        if self.ca_cert.exists():
            raise ConfigError(f"{self.root} already holds a federation CA; refusing to replace it")
        if not server_hosts:
            raise ConfigError("give at least one --server-host")
        for name in hospitals:
            pki.check_name(name)
        if len(set(hospitals)) != len(hospitals):
            raise ConfigError("hospital names must be unique")
        ca = pki.make_ca(federation, now=now)
        _save(self.root, "ca", ca)
        meta = {"server_hosts": server_hosts, "port": port, "revoked": []}
        _write(self.root / "federation.json", json.dumps(meta, indent=2).encode())
        self.write_crl(ca, now=now)
        _save(self.root, "server", pki.issue(ca, pki.Role.SERVER, "server", hosts=server_hosts,
                                             now=now))
        admin = pki.issue(ca, pki.Role.ADMIN, "admin", now=now)
        _save(self.root, "admin", admin)
        _write(self.root / "admin.toml", self._settings_toml("admin", "admin.pem", "admin.key",
                                                             "ca.pem"))
        for name in hospitals:
            self.add_hospital(name, now=now, _ca=ca)
        server_toml = self._settings_toml("server", "server.pem", "server.key", "ca.pem")
        server_toml += (
            'crl = "crl.pem"\nhost = "0.0.0.0"\n'
            'store_dir = "store"\naudit_log = "audit.jsonl"\n'
            f"hospitals = {json.dumps(hospitals)}\n\n"
            "[model]\n"
            "# Version 0, made when the store is empty: the hospitals' CNN, built from the same\n"
            "# settings as the [ml] table of every hospital kit (change both together, before\n"
            "# the first start).\n"
            "seed = 0\n\n[model.ml]\n" + _MODEL_SPEC
        ).encode()
        _write(self.root / "server.toml", server_toml.replace(
            f'host = "{server_hosts[0]}"\n'.encode(), b"", 1))

    def add_hospital(
        self,
        name: str,
        *,
        now: dt.datetime | None = None,
        lifetime: dt.timedelta | None = None,
        _ca: pki.Credential | None = None,
    ) -> Path:
        """Issue a hospital certificate and its kit; returns the kit folder."""
        pki.check_name(name)
        if self.member_cert(name).exists() and name not in self._meta()["revoked"]:
            raise ConfigError(f"hospital '{name}' already has a certificate")
        ca = _ca or self.ca()
        cred = pki.issue(ca, pki.Role.HOSPITAL, name, now=now, lifetime=lifetime)
        _write(self.member_cert(name), cred.cert_pem())
        kit = self.kit(name)
        _save(kit, "hospital", cred)
        _write(kit / "ca.pem", ca.cert_pem())
        _write(kit / "hospital.toml",
               self._settings_toml(name, "hospital.pem", "hospital.key", "ca.pem")
               + _HOSPITAL_TAIL.encode())
        return kit

    def _settings_toml(self, name: str, cert: str, key: str, ca: str) -> bytes:
        meta = self._meta()
        lines = [
            f"# securefl settings for '{name}'; paths are relative to this file.",
            f'host = "{meta["server_hosts"][0]}"',
            f"port = {meta['port']}",
            f'cert = "{cert}"',
            f'key = "{key}"',
            f'ca = "{ca}"',
            "",
        ]
        return "\n".join(lines).encode()

    def revoke(self, name: str, *, now: dt.datetime | None = None) -> None:
        """Put a member's certificate on the CRL; the server refuses it from then on."""
        path = self.member_cert(name)
        if not path.exists():
            raise ConfigError(f"no certificate was issued to '{name}'")
        meta = self._meta()
        serial = pki.load_cert(path.read_bytes()).serial_number
        if serial not in meta["revoked"]:
            meta["revoked"].append(serial)
        _write(self.root / "federation.json", json.dumps(meta, indent=2).encode())
        self.write_crl(self.ca(), now=now)

    def write_crl(self, ca: pki.Credential, *, now: dt.datetime | None = None) -> None:
        now = now or dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + CRL_LIFETIME)
        )
        for serial in self._meta()["revoked"]:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=5))
                .build()
            )
        crl = builder.sign(ca.key, hashes.SHA256())
        _write(self.crl, crl.public_bytes(serialization.Encoding.PEM))

    def renew(self, member: str | None = None, *, now: dt.datetime | None = None) -> Path:
        """A fresh server certificate (and a fresh CRL, whose validity also runs out), or,
        with ``member``, a fresh one-year certificate for the admin or one hospital.

        Returns the folder to copy to the machine that uses it.  A hospital's renewed
        certificate and key replace those in its kit; its ``hospital.toml`` is left as the
        hospital edited it.  The old certificate stays valid until it expires: revoke it if
        it may have leaked.
        """
        ca = self.ca()
        if member is None:
            hosts = self._meta()["server_hosts"]
            _save(self.root, "server", pki.issue(ca, pki.Role.SERVER, "server", hosts=hosts,
                                                 now=now))
            self.write_crl(ca, now=now)
            return self.root
        if member == "admin":
            _save(self.root, "admin", pki.issue(ca, pki.Role.ADMIN, "admin", now=now))
            return self.root
        if not self.member_cert(member).exists():
            raise ConfigError(f"no certificate was issued to '{member}': use add-hospital")
        if pki.load_cert(self.member_cert(member).read_bytes()).serial_number in \
                self._meta()["revoked"]:
            raise ConfigError(f"'{member}' was revoked: issue a new kit with add-hospital")
        cred = pki.issue(ca, pki.Role.HOSPITAL, member, now=now)
        _write(self.member_cert(member), cred.cert_pem())
        kit = self.kit(member)
        _save(kit, "hospital", cred)
        _write(kit / "ca.pem", ca.cert_pem())
        return kit

    def show(self) -> list[dict[str, str]]:
        """One row per certificate: role, name, expiry, fingerprint, revoked or not."""
        revoked = set(self._meta()["revoked"])
        paths = [self.ca_cert, self.root / "server.pem", self.root / "admin.pem"]
        paths += sorted((self.root / "members").glob("*.pem"))
        rows = []
        for path in paths:
            if not path.exists():
                continue
            cert = pki.load_cert(path.read_bytes())
            role, name = pki.identity_of(cert)
            rows.append(
                {
                    "role": role.value,
                    "name": name,
                    "expires": f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
                    "status": "revoked" if cert.serial_number in revoked else "valid",
                    "sha256": fingerprint(cert),
                }
            )
        return rows
