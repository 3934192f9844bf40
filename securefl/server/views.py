"""Read-only views for the admin dashboard: hospitals, version history, audit tail.

Why a module of its own: these are pure reads of state the coordinator, the model store and
the audit log already keep, so they need none of the round logic; keeping them here leaves
the coordinator's round code untouched.  The audit view copies only plain scalar fields of
each entry (the log never holds keys, shares or weights, and the chain hash is left out as
noise for people).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509

from securefl.protocol import messages as wm
from securefl.server import audit
from securefl.server.store import ModelStore

_HIDDEN = {"seq", "time", "event", "name", "prev"}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def cert_expiry(cert_der: bytes) -> str:
    """The certificate's notAfter as UTC ISO text ("" if it cannot be read)."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        return ""
    return cert.not_valid_after_utc.isoformat(timespec="seconds")


def hospital_rows(
    registered: list[str], online: list[str], joined: list[str], submitted: list[str],
    last_seen: dict[str, str], expiry: dict[str, str],
) -> list[wm.HospitalRow]:
    names = sorted(set(registered) | set(online) | set(last_seen))
    return [
        wm.HospitalRow(name=n, registered=n in registered, online=n in online,
                       joined=n in joined, submitted=n in submitted,
                       last_seen=last_seen.get(n, ""), cert_expires=expiry.get(n, ""))
        for n in names
    ]


def version_rows(store: ModelStore, limit: int) -> list[wm.VersionRow]:
    rows = []
    for v in store.versions()[-limit:]:
        info = store.info(v)
        rows.append(wm.VersionRow(version=info.version, created=info.created,
                                  contributors=info.contributors,
                                  total_samples=info.total_samples, sha256=info.sha256))
    return rows


def audit_rows(path: Path, limit: int) -> list[wm.AuditRow]:
    rows = []
    for entry in audit.tail(path, limit):
        detail = " ".join(
            f"{k}={v}" for k, v in entry.items()
            if k not in _HIDDEN and isinstance(v, str | int | float | bool | list)
        )
        # -1: a damaged line has no number of its own (0 is the log's first entry).
        rows.append(wm.AuditRow(seq=int(entry.get("seq", -1)), time=str(entry.get("time", "")),
                                event=str(entry.get("event", "")),
                                name=str(entry.get("name", "")), detail=detail[:500]))
    return rows
