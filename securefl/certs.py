"""Federation certificates on disk: the folder ``securefl certs`` manages, and hospital kits.

``securefl.crypto.pki`` builds certificates in memory; this module is the file layer on top:
where each file lives, private keys written 0600 from the first byte (``os.open`` with the
mode, never chmod after the fact), the certificate revocation list the server loads, and a
self-contained kit folder per hospital to copy to that hospital's machine.

Layout of the certificate folder (everything but README/.gitignore stays out of git)::

    ca.pem ca.key            federation CA (the key signs certificates, the CRL, the member list)
    crl.pem                  revocation list, always present (the server requires one)
    members.json             the signed member list: each hospital's name and the sha256 of
                             its current certificate (``securefl.crypto.membership``)
    server.pem server.key    server certificate, SANs = hosts given to ``init``
    admin.pem admin.key      the operator's certificate
    members/<name>.pem       every hospital certificate ever issued (revocation needs them)
    kits/<name>/             hospital.pem hospital.key ca.pem crl.pem members.json
                             hospital.toml
    federation.json          server hosts and port, reused by ``add-hospital`` and ``renew``
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from securefl.config import toml_text
from securefl.crypto import pki
from securefl.crypto.membership import MemberList
from securefl.errors import ConfigError
from securefl.fsutil import replace_file
from securefl.ml.settings import DEFAULT_CLASSES
from securefl.protocol.messages import MAX_BYTES_FIELD

# The model every party builds; the server's [model.ml] and each kit's [ml] repeat it.
_MODEL_SPEC: dict[str, object] = {"image_size": 128, "model_kind": "small",
                                  "classes": list(DEFAULT_CLASSES)}
_HOSPITAL_COMMENT = """\
state_dir   where this hospital keeps the downloaded global model and its round state.
The [ml] table:
  scans_dir   this hospital's scans: Training/<class>/*.jpg and Testing/<class>/*.jpg,
              one folder per class.  They never leave this machine.
  model_dir   the local model (model.keras) and its metrics history.
  classes     the federation's classes, in the server's order: leave them as they are.
Class folders named otherwise (e.g. glioma_tumor, no_tumor) are mapped once, in a table
named ml.class_folders with one line per class:  glioma = "glioma_tumor"
"""
_SERVER_COMMENT = """\
[model]     version 0, made when the store is empty: the hospitals' CNN, built from the
            same settings as the [ml] table of every hospital kit (change both together,
            before the first start).  [model.ml] classes is the federation's label order."""


def _hospital_ml() -> dict[str, object]:
    """The kit's [ml] table: the training settings are MLSettings' own defaults (chosen on
    validation, docs/ML.md), written out so a hospital sees what it may change."""
    from securefl.ml.settings import MLSettings

    fields = MLSettings.model_fields
    trained: dict[str, object] = {k: fields[k].default for k in ("epochs", "patience", "batch_size",
                                              "validation_fraction",
                                              "min_validation_per_class",
                                              "confidence_threshold", "personalise")
               if k in fields}
    return {"scans_dir": "scans", "model_dir": "model", **_MODEL_SPEC, "seed": 0, **trained}


CRL_LIFETIME = dt.timedelta(days=30)
DEFAULT_PORT = 9095
#: Names ``revoke`` and ``renew`` take for the federation's own certificates.
RESERVED = ("server", "admin")


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write a file atomically; private keys are created 0600 so they are never readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data, mode=0o600 if private else 0o644)


def _save(folder: Path, stem: str, cred: pki.Credential) -> None:
    _write(folder / f"{stem}.pem", cred.cert_pem())
    _write(folder / f"{stem}.key", cred.key_pem(), private=True)


def load_credential(cert_path: Path, key_path: Path) -> pki.Credential:
    """Read a certificate and its key, with one sentence naming the file at fault when
    either is missing, unreadable, not PEM, or when the key belongs to another
    certificate."""
    cert, key = _load_pair(cert_path, key_path)
    return pki.Credential(cert, key)


def _read(path: Path, what: str, fix: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"the {what} {path} does not exist: {fix}") from None
    except IsADirectoryError:
        raise ConfigError(f"the {what} {path} is a folder, not a file: {fix}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path} ({exc.strerror}): check its "
                          "permissions for the user running securefl") from None


def _load_pair(cert: Path, key: Path) -> tuple[x509.Certificate, Any]:
    fix = "check the path in the settings file, or copy the file from the kit"
    cert_data = _read(cert, "certificate", fix)
    key_data = _read(key, "private key", fix)
    try:
        cert_obj = x509.load_pem_x509_certificate(cert_data)
    except ValueError:
        raise ConfigError(f"{cert} is not a PEM certificate (it should start with "
                          "'-----BEGIN CERTIFICATE-----'): copy the .pem file from the kit "
                          "again") from None
    try:
        key_obj = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise ConfigError(f"the private key {key} is protected by a passphrase, which "
                          "securefl cannot use: copy the key from the kit again") from None
    except ValueError:
        raise ConfigError(f"{key} is not a PEM private key (it should start with "
                          "'-----BEGIN PRIVATE KEY-----'): copy the .key file from the kit "
                          "again") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key_obj.public_key().public_bytes(serialization.Encoding.DER, pub)
            != cert_obj.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise ConfigError(f"the private key {key} does not belong to the certificate {cert}: "
                          "copy the key that was issued with this certificate (both come "
                          "from the same kit, or `certs renew` wrote them together)")
    return cert_obj, key_obj


def check_tls_files(cert: Path, key: Path, ca: Path) -> None:
    """Raise one ``ConfigError`` naming the file at fault when a certificate, its key and the
    CA file cannot work together: missing, unreadable, not PEM, a key of another
    certificate, a certificate of another CA.

    Why before TLS loads them: OpenSSL says only "key values mismatch" or nothing at all (a
    certificate of another CA loads fine and is refused by the peer later, which looks like
    a revocation), and the old message named ca.pem for a wrong key.
    """
    cert_obj, _ = _load_pair(cert, key)
    ca_data = _read(ca, "CA certificate", "check the path in the settings file, or copy "
                    "ca.pem from the kit")
    try:
        ca_obj = x509.load_pem_x509_certificate(ca_data)
    except ValueError:
        raise ConfigError(f"{ca} is not a PEM certificate: copy ca.pem from the kit "
                          "again") from None
    try:
        cert_obj.verify_directly_issued_by(ca_obj)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"the certificate {cert} was not issued by the CA in {ca} (it "
                          "belongs to another federation, or ca.pem is another "
                          "federation's): copy both from the same certificate folder or "
                          "kit") from None


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER certificate, as people compare them over the phone."""
    digest = hashlib.sha256(pki.cert_der(cert)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _local_address(hosts: list[str]) -> str | None:
    """The first of ``hosts`` that is an IP address of this machine (``localhost`` counts),
    so the generated server.toml listens only there rather than on every interface.

    Only literal addresses are tried: resolving names would wait on DNS, and the server
    usually runs on another machine than the one making the certificates anyway.
    """
    import ipaddress
    import socket

    for host in hosts:
        ip = "127.0.0.1" if host == "localhost" else host
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
        except ValueError:
            continue
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((ip, 0))
        except OSError:
            continue
        return host
    return None


def _hospital_name(name: str) -> str:
    if name in RESERVED:
        raise ConfigError(f"'{name}' names the federation's own {name} certificate: choose "
                          "another name for the hospital")
    return pki.check_name(name)


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

    @property
    def members(self) -> Path:
        return self.root / "members.json"

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
    ) -> str:
        """CA, server, admin, one certificate and kit per hospital, and an empty CRL.

        Returns the address ``server.toml`` listens on: the first ``server_hosts`` entry
        that is an address of this machine, else "0.0.0.0" (every interface), which the
        caller should warn about."""
        if self.ca_cert.exists():
            raise ConfigError(f"{self.root} already holds a federation CA; refusing to replace it")
        if not server_hosts:
            raise ConfigError("give at least one --server-host")
        for name in hospitals:
            _hospital_name(name)
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
            self._issue_kit(ca, name, now=now, lifetime=None)
        self.write_members(ca, now=now)
        server = self._settings("server.pem", "server.key", "ca.pem")
        listen = _local_address(server_hosts) or "0.0.0.0"
        server.update(crl="crl.pem", members="members.json", host=listen,
                      store_dir="store",
                      audit_log="audit.jsonl", hospitals=hospitals,
                      model={"seed": 0, "ml": _MODEL_SPEC})
        _write(self.root / "server.toml", toml_text(
            server, self._comment("server") + "\n" + _SERVER_COMMENT).encode())
        return listen

    def add_hospital(
        self,
        name: str,
        *,
        now: dt.datetime | None = None,
        lifetime: dt.timedelta | None = None,
        _ca: pki.Credential | None = None,
    ) -> Path:
        """Issue a hospital certificate and its kit, and a member list naming it (also into
        every other kit); returns the kit folder.  A revoked hospital may be added again,
        with a new certificate."""
        _hospital_name(name)
        if self.member_cert(name).exists() and not self._revoked(self.member_cert(name)):
            raise ConfigError(f"hospital '{name}' already has a certificate: use `renew "
                              f"{name}` for a fresh one, or `revoke {name}` first")
        ca = _ca or self.ca()
        kit = self._issue_kit(ca, name, now=now, lifetime=lifetime)
        self.write_members(ca, now=now)
        return kit

    def _issue_kit(self, ca: pki.Credential, name: str, *, now: dt.datetime | None,
                   lifetime: dt.timedelta | None) -> Path:
        cred = pki.issue(ca, pki.Role.HOSPITAL, name, now=now, lifetime=lifetime)
        _write(self.member_cert(name), cred.cert_pem())
        kit = self.kit(name)
        _save(kit, "hospital", cred)
        _write(kit / "ca.pem", ca.cert_pem())
        _write(kit / "crl.pem", self.crl.read_bytes())
        settings = self._settings("hospital.pem", "hospital.key", "ca.pem")
        settings.update(crl="crl.pem", members="members.json", state_dir="state",
                        ml=_hospital_ml())
        _write(kit / "hospital.toml",
               toml_text(settings, self._comment(name) + "\n" + _HOSPITAL_COMMENT).encode())
        return kit

    def _revoked(self, cert_path: Path) -> bool:
        return pki.load_cert(cert_path.read_bytes()).serial_number in self._meta()["revoked"]

    def write_members(self, ca: pki.Credential | None = None, *,
                      now: dt.datetime | None = None) -> MemberList:
        """Sign a fresh member list — every hospital with a certificate here that is not
        revoked, with the fingerprint of its current one — and copy it into every kit.

        Why derived from the folder rather than edited: the list then always says what the
        certificates say; ``add-hospital``, ``revoke`` and ``renew NAME`` call it, and
        ``securefl certs members`` re-signs it (for folders made before member lists)."""
        ca = ca or self.ca()
        current: dict[str, bytes] = {}
        for path in sorted((self.root / "members").glob("*.pem")):
            cert = pki.load_cert(path.read_bytes())
            if cert.serial_number not in self._meta()["revoked"]:
                current[path.stem] = pki.cert_der(cert)
        meta = self._meta()
        number = int(meta.get("members_number", 0)) + 1
        listed = MemberList.issue(ca.cert, ca.key, current, number=number, now=now)
        data = listed.to_bytes()
        if len(data) > MAX_BYTES_FIELD:
            raise ConfigError(
                f"the member list of {len(current)} hospitals would be {len(data)} bytes, "
                f"more than the {MAX_BYTES_FIELD} a welcome message carries: the protocol "
                "does not support a federation this large yet (the new certificate was "
                "issued; revoke it)")
        meta["members_number"] = number
        _write(self.root / "federation.json", json.dumps(meta, indent=2).encode())
        _write(self.members, data)
        kits = self.root / "kits"
        for kit in sorted(kits.iterdir()) if kits.is_dir() else []:
            if (kit / "hospital.toml").is_file():
                _write(kit / "members.json", data)
        return listed

    def _settings(self, cert: str, key: str, ca: str) -> dict[str, object]:
        meta = self._meta()
        return {"host": meta["server_hosts"][0], "port": meta["port"], "cert": cert,
                "key": key, "ca": ca}

    @staticmethod
    def _comment(name: str) -> str:
        return f"securefl settings for '{name}'; paths are relative to this file."

    def _settings_toml(self, name: str, cert: str, key: str, ca: str) -> bytes:
        return toml_text(self._settings(cert, key, ca), self._comment(name)).encode()

    def revoke(self, name: str, *, now: dt.datetime | None = None) -> None:
        """Put a certificate on the CRL: a hospital's (which also leaves the member list),
        the admin's, or the server's (``name`` "server": a new server certificate is issued
        at once, since the federation cannot run without one)."""
        path = self.root / f"{name}.pem" if name in RESERVED else self.member_cert(name)
        if not path.exists():
            raise ConfigError(f"no certificate was issued to '{name}'")
        ca = self.ca()
        meta = self._meta()
        serial = pki.load_cert(path.read_bytes()).serial_number
        if serial not in meta["revoked"]:
            meta["revoked"].append(serial)
        _write(self.root / "federation.json", json.dumps(meta, indent=2).encode())
        if name == "server":
            _save(self.root, "server", pki.issue(ca, pki.Role.SERVER, "server",
                                                 hosts=meta["server_hosts"], now=now))
        self.write_crl(ca, now=now)
        if name not in RESERVED:
            self.write_members(ca, now=now)

    def write_crl(self, ca: pki.Credential, *, now: dt.datetime | None = None) -> None:
        """A fresh, numbered revocation list, also into every kit folder here.

        Why numbered: hospitals keep the newest list they have seen and refuse a server
        that offers an older one (which could hide a revocation)."""
        now = now or dt.datetime.now(dt.UTC)
        meta = self._meta()
        meta["crl_number"] = int(meta.get("crl_number", 0)) + 1
        _write(self.root / "federation.json", json.dumps(meta, indent=2).encode())
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + CRL_LIFETIME)
            .add_extension(x509.CRLNumber(meta["crl_number"]), critical=False)
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
        kits = self.root / "kits"
        for kit in sorted(kits.iterdir()) if kits.is_dir() else []:
            if (kit / "hospital.toml").is_file():
                _write(kit / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))

    def renew(self, member: str | None = None, *, now: dt.datetime | None = None) -> Path:
        """A fresh server certificate (and a fresh CRL, whose validity also runs out), or,
        with ``member``, a fresh one-year certificate for the admin or one hospital.

        Returns the folder to copy to the machine that uses it.  A hospital's renewed
        certificate and key replace those in its kit; its ``hospital.toml`` is left as the
        hospital edited it.  The member list is re-signed with the new certificate's
        fingerprint, so hospitals refuse rounds that present the old one; the server still
        lets the old one connect until it expires: revoke it if it may have leaked.
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
        if self._revoked(self.member_cert(member)):
            raise ConfigError(f"'{member}' was revoked: issue a new kit with add-hospital")
        cred = pki.issue(ca, pki.Role.HOSPITAL, member, now=now)
        _write(self.member_cert(member), cred.cert_pem())
        kit = self.kit(member)
        _save(kit, "hospital", cred)
        _write(kit / "ca.pem", ca.cert_pem())
        self.write_members(ca, now=now)  # the member list pins the new certificate
        return kit

    def set_server(self, hosts: list[str] | None = None, port: int | None = None, *,
                   now: dt.datetime | None = None) -> str:
        """Move the federation's server to other names/addresses or another port.

        Reissues the server certificate for ``hosts`` (hospitals check the name they
        connect to against it) and rewrites every file that names the server:
        ``federation.json`` (future kits), ``server.toml``, ``admin.toml`` and each kit's
        ``hospital.toml`` (only ``host`` and ``port``; whatever else the files say stays).
        Needs ``ca.key``, so it runs on the operator's machine.  Returns the address
        ``server.toml`` now listens on, as ``init`` does ("0.0.0.0": warn the caller).
        The old server certificate is not revoked: it names only the old hosts, which the
        hospitals no longer connect to (``revoke server`` if its key may have leaked)."""
        meta = self._meta()
        hosts = hosts or list(meta["server_hosts"])
        port = meta["port"] if port is None else port
        if not 1 <= port <= 65535:
            raise ConfigError(f"port {port} is not a TCP port (1 to 65535)")
        if not (self.root / "ca.key").exists():
            raise ConfigError(f"set-server needs the CA key {self.root / 'ca.key'} to issue "
                              "the new server certificate: run it on the operator's machine, "
                              "in the folder `certs init` made")
        ca = self.ca()
        _save(self.root, "server", pki.issue(ca, pki.Role.SERVER, "server", hosts=hosts,
                                             now=now))
        meta.update(server_hosts=hosts, port=port)
        _write(self.root / "federation.json", json.dumps(meta, indent=2).encode())
        listen = _local_address(hosts) or "0.0.0.0"
        self._retarget(self.root / "server.toml", {"host": listen, "port": port},
                       self._comment("server") + "\n" + _SERVER_COMMENT)
        self._retarget(self.root / "admin.toml", {"host": hosts[0], "port": port},
                       self._comment("admin"))
        kits = self.root / "kits"
        for kit in sorted(kits.iterdir()) if kits.is_dir() else []:
            if (kit / "hospital.toml").is_file():
                self._retarget(kit / "hospital.toml", {"host": hosts[0], "port": port},
                               self._comment(kit.name) + "\n" + _HOSPITAL_COMMENT)
        return listen

    @staticmethod
    def _retarget(path: Path, changes: dict[str, object], comment: str) -> None:
        """``changes`` into a settings file, keeping every other key as it is."""
        from securefl.config import read_toml

        if not path.is_file():
            return
        data = read_toml(path)
        data.update(changes)
        _write(path, toml_text(data, comment).encode())

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
            if path == self.ca_cert:  # "securefl CA" is no member name: not identity_of's
                cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
                role, name = pki.Role.CA, str(cn[0].value) if cn else "CA"
            else:
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
        if self.crl.exists():
            # The list every hospital checks the server against lapses after CRL_LIFETIME
            # (QUICKSTART: renew monthly), yet show listed only certificates (a walk).
            crl = x509.load_pem_x509_crl(self.crl.read_bytes())
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            due = crl.next_update_utc
            lapsed = due is not None and due <= dt.datetime.now(dt.UTC)
            rows.append({
                "role": "crl",
                "name": f"revocation list #{number}",
                "expires": f"{due:%Y-%m-%d %H:%M} UTC" if due is not None else "never",
                "status": "expired" if lapsed else "valid",
                "sha256": (f"{len(crl)} revoked; renew with `securefl certs renew`"
                           if not lapsed else "renew it now: `securefl certs renew`"),
            })
        return rows
