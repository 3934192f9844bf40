"""What ``securefl admin ACTION`` prints: aligned tables for people, JSON for scripts.

Why pure functions of the session's records: the same rows feed the command, its ``--json``
form and ``docs/generate_samples.py`` (QUICKSTART's samples are the command's real output),
and a test compares the documented headers with these.  The JSON shapes are a contract:
``status`` and ``schedule`` one object, ``hospitals``/``history``/``audit`` one object per
line, as they were before the tables existed; fields are only ever added.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

from securefl.client.session import AggregateOutcome, AuditEntry, HospitalInfo, ServerStatus
from securefl.client.session import VersionEntry as Version
from securefl.protocol.messages import ScheduleView

HOSPITALS_HEADER = ("hospital", "registered", "online", "in round", "sent", "last seen (UTC)",
                    "certificate expires")
HISTORY_HEADER = ("version", "published (UTC)", "hospitals", "scans", "sha256 (first 16)")
AUDIT_HEADER = ("seq", "time (UTC)", "event", "who", "detail")
#: Columns whose values are numbers: right-aligned.
_NUMERIC = {"version", "hospitals", "scans", "seq"}


def when(iso: str) -> str:
    """UTC ISO text as people read it: ``2025-03-01 14:05:09`` ("-" when unknown)."""
    if not iso:
        return "-"
    return iso.replace("T", " ")[:19]


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Columns as wide as their widest cell, two spaces apart, numbers right-aligned; the
    last column is not padded (it may be long, and trailing spaces help no one)."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [cell.rjust(w) if header[i] in _NUMERIC else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        parts[-1] = row[-1] if header[-1] not in _NUMERIC else parts[-1]
        lines.append("  ".join(parts).rstrip())
    return lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "-"


def status_lines(st: ServerStatus) -> list[str]:
    round_text = (f"{st.round_id} ({st.phase})" if st.round_id else f"none ({st.phase})")
    rows = [("version", str(st.version)), ("round", round_text),
            ("online", _names(st.online)), ("joined", _names(st.joined)),
            ("sent", f"{_names(st.submitted)} ({st.collected} masked update"
                     f"{'' if st.collected == 1 else 's'} collected)")]
    if st.waiting_for:
        rows.append(("waiting for", _names(st.waiting_for)))
    return [f"{k:<12} {v}" for k, v in rows]


def doomed_reason(round_id: int, entries: Sequence[AuditEntry]) -> str | None:
    """Why round ``round_id`` cannot finish, from the server's ``round-doomed`` entry (None:
    no such entry), for ``status`` and the admin app to say in their own words.

    Why from the audit log: the status reply has no field for it (the wire stays as it
    is), and the phase alone read "collecting" for a round that could no longer finish."""
    prefix = f"round_id={round_id} reason="
    for e in reversed(entries):
        if e.event == "round-doomed" and e.detail.startswith(prefix):
            return e.detail.removeprefix(prefix).split(" resend=", 1)[0]
    return None


def status_json(st: ServerStatus) -> str:
    return json.dumps({
        "version": st.version, "round": st.round_id, "phase": st.phase,
        "online": list(st.online), "joined": list(st.joined),
        "submitted": list(st.submitted), "collected": st.collected,
        "waiting_for": list(st.waiting_for)})


def hospitals_lines(rows: Sequence[HospitalInfo]) -> list[str]:
    if not rows:
        return ["no hospitals registered or seen yet (`hospitals` in server.toml)"]
    return table(HOSPITALS_HEADER, [
        (h.name, _yes(h.registered), _yes(h.online), _yes(h.joined), _yes(h.submitted),
         when(h.last_seen), when(h.cert_expires)[:10]) for h in rows])


def history_lines(rows: Sequence[Version]) -> list[str]:
    return table(HISTORY_HEADER, [
        (v.version, when(v.created), v.contributors, v.total_samples, v.sha256[:16])
        for v in rows])


def audit_lines(rows: Sequence[AuditEntry]) -> list[str]:
    return table(AUDIT_HEADER, [
        (e.seq if e.seq >= 0 else "-", when(e.time), e.event, e.name or "-", e.detail or "-")
        for e in rows])


def json_lines(rows: Sequence[HospitalInfo | Version | AuditEntry]) -> list[str]:
    """One JSON object per row, the shape scripts have read since these actions existed."""
    return [json.dumps(asdict(r)) for r in rows]


def aggregate_json(out: AggregateOutcome) -> str:
    return json.dumps({"version": out.version, "contributors": out.contributors,
                       "total_samples": out.total_samples, "sha256": out.sha256})


def hospital_part(status: str) -> str:
    """A hospital's part in a scheduled round as people read it: the wire's
    ``failed:<reason>`` codes become words (``failed:no-scans`` -> "training failed: no
    scans")."""
    if status.startswith("failed:"):
        return "training failed: " + status.removeprefix("failed:").replace("-", " ")
    return status


def schedule_lines(view: ScheduleView) -> list[str]:
    """The schedule as people read it: how rounds open, the next, the open one and each
    hospital's part in it, and a version the cross-round rule holds up."""
    if view.mode == "manual":
        rows = [("mode", "manual: a round opens when a hospital sends, and publishes when "
                 "you run aggregate ([schedule] mode = \"auto\" in server.toml to change)")]
    else:
        every = ("right after each round ends" if view.every == "after-publish"
                 else f"every {view.every}")
        rows = [("mode", f"auto, {'paused' if view.paused else 'running'}"),
                ("rounds open", f"{every}; hospitals have {view.training_deadline} to join"),
                ("next round", f"{when(view.next_open)} UTC" if view.next_open else
                 "when you resume" if view.paused else
                 "once the open round has ended" if view.round else "now")]
    r = view.round
    if r is not None:
        rows += [("open round", f"{r.schedule_round} on version {r.base_version} "
                  f"({r.phase}); opened {when(r.opened)}, deadline {when(r.deadline)} UTC")]
        rows += [(f"  {name}", hospital_part(status))
                 for name, status in sorted(r.hospitals.items())]
    elif view.mode == "auto":
        rows.append(("open round", "none"))
    if view.stalled is not None:
        rows.append(("stalled", f"version {view.stalled.base_version}: "
                     f"{view.stalled.reason}"))
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def schedule_json(view: ScheduleView) -> str:
    """The ``schedule`` query's fields as the wire has them (PROTOCOL.md)."""
    return view.model_dump_json()
