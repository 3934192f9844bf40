"""What the server tells its operator on the console: rounds, refusals, warnings.

Why fed from the audit log's entries: everything an operator needs to see already becomes an
audit entry at the one place it happens (round opened, enrolment closed, published, failed,
refused connections with the reason).  Turning those entries into sentences here keeps the
console and ``audit.jsonl`` in agreement and adds no logging call to the round code.  Entries
an operator does not need minute by minute (each connection, each key step) are logged at
DEBUG, so ``--log-level debug`` shows the whole conversation and ``info`` only what matters.

``--json-logs``: one JSON object per line (time, level, message, and the audit entry's
fields under ``event``) for a log collector.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("securefl.server")

LEVELS = ("debug", "info", "warning", "error")
_HIDDEN = {"time", "seq", "prev", "event", "durable"}


def _names(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list | tuple) and value else "-"


def _refused_connections(e: Mapping[str, Any]) -> str:
    count = e.get("count", 0)
    return (f"refused {count} connection{'' if count == 1 else 's'} that never "
            f"authenticated, from {e.get('addresses', '?')} address(es): "
            f"{'; '.join(map(str, e.get('reasons', [])))} (busiest: "
            f"{'; '.join(map(str, e.get('sources', [])))})")


def _refused(e: Mapping[str, Any]) -> str:
    who = f"{e.get('role', 'hospital')} '{e.get('name', '?')}'"
    where = f" from {e['address']}" if e.get("address") else ""
    what = f" ({e['action']})" if e.get("action") else ""
    return f"refused {who}{where}{what}: {e.get('reason', 'no reason given')}"


def _closed(e: Mapping[str, Any]) -> str:
    return f"closed the connection of '{e.get('name', '?')}': {e.get('reason', '')}"


def _schedule_closed(e: Mapping[str, Any]) -> str:
    outcome = e.get("outcome", "?")
    what = {"published": f"published version {e.get('version')}",
            # the schedule's own sentence says why (deadline, or everyone else declined)
            "expired": f"expired: {e['message']}" if e.get("message") else
                       "expired: too few hospitals joined before the deadline, nothing "
                       "published",
            "aborted": "aborted by the administrator, nothing published",
            "abandoned": "abandoned: the round could not be finished, nothing published",
            }.get(str(outcome), str(outcome))
    return f"scheduled round {e.get('schedule_round')} closed: {what}"


#: Audit event -> (console level, sentence).  Events not listed go out at DEBUG as they are;
#: those whose module already logs a sentence of its own (publish-deferred, bad-shares,
#: optimiser-restarted) are DEBUG here so the console says it once.
MESSAGES: dict[str, tuple[int, Callable[[Mapping[str, Any]], str]]] = {
    "round-open": (logging.INFO, lambda e: f"round {e['round_id']} opened on version "
                   f"{e['base_version']}: waiting for hospitals to join"),
    "join": (logging.INFO, lambda e: f"round {e['round_id']}: '{e['name']}' joined"),
    "submission": (logging.INFO, lambda e: f"round {e['round_id']}: '{e['name']}' sent its "
                   "masked update"),
    "enrolment-closed": (logging.INFO, lambda e: f"round {e['round_id']}: enrolment closed "
                         f"with {len(e.get('members') or [])} hospitals "
                         f"({_names(e.get('members'))})"
                         + (f"; left out: {_names(e['left_out'])}" if e.get("left_out")
                            else "")),
    "member-left": (logging.INFO, lambda e: f"round {e['round_id']}: '{e['name']}' left"),
    "aggregated": (logging.INFO, lambda e: (
                   f"round {e['round_id']} published version " if e.get("round_id") else
                   "recorded version ")  # round 0: reconciled, its round not known
                   + f"{e['version']} from {e['contributors']} hospitals"
                   + (" (it had been held until the store was writable)"
                      if e.get("deferred") else "")),
    "round-failed": (logging.WARNING, lambda e: f"round {e['round_id']} failed "
                     f"({e.get('reason', '')}): nothing was published"),
    "round-abandoned": (logging.WARNING, lambda e: f"round {e['round_id']} abandoned "
                        f"({e.get('reason', '')}): nothing was published; its hospitals "
                        "send again"),
    "round-retry": (logging.INFO, lambda e: f"round {e['round_id']} opened to retry round "
                    f"{e['failed_round']} (attempt {e['attempt']}) with "
                    f"{_names(e.get('invited'))}"),
    "round-bound": (logging.WARNING, lambda e: f"round {e['round_id']}'s survivor list went "
                    f"out: the next round on version {e['base_version']} may combine only "
                    f"{_names(e.get('names'))}"),
    "round-doomed": (logging.WARNING, lambda e: f"round {e['round_id']} cannot finish: "
                     f"{e['reason']}; "
                     + ("`securefl admin abort` or `aggregate` ends it with nothing "
                        "published, and its hospitals send again into a new round"
                        if e.get("resend") else
                        "nothing can be published from it, and hospitals whose masked "
                        "updates went in send nothing more on this version (docs/SECURITY.md)")),
    "refused-publish": (logging.WARNING, lambda e: f"round {e['round_id']}: nothing "
                        f"published ({e.get('reason', '')})"),
    "withheld": (logging.WARNING, lambda e: f"round {e['round_id']}: "
                 f"{_names(e.get('names'))} stopped answering and wait for the next round"),
    "schedule-open": (logging.INFO, lambda e: f"scheduled round {e['schedule_round']} "
                      f"opened on version {e['base_version']}: hospitals train and join "
                      f"until {e['deadline']}"),
    "schedule-closed": (logging.INFO, _schedule_closed),
    "training-failed": (logging.WARNING, lambda e: f"scheduled round {e['schedule_round']}: "
                        f"'{e['name']}' will not take part ({e['reason']})"),
    "schedule-paused": (logging.INFO, lambda e: "the schedule is paused: no round opens "
                        "until it is resumed"),
    "schedule-resumed": (logging.INFO, lambda e: "the schedule is running again"),
    "audit-damaged": (logging.WARNING, lambda e: f"{e['message']} (found at start-up; "
                      "`securefl server --verify-audit` checks it again)"),
    "connections-refused": (logging.WARNING, _refused_connections),
    "refused": (logging.WARNING, _refused),
    "request-refused": (logging.INFO, lambda e: f"refused a request of '{e.get('name')}' "
                        f"({e.get('code')}): {e.get('reason', '')}"),
    "admin": (logging.INFO, lambda e: f"the administrator asked to {e.get('action')}"),
    "closed": (logging.INFO, _closed),
}


def on_audit(entry: Mapping[str, Any]) -> None:
    """Log one audit entry as the operator's sentence (``AuditLog.listener``)."""
    event = str(entry.get("event", ""))
    level, say = MESSAGES.get(event, (logging.DEBUG, None))
    if event == "closed" and "certificate" not in str(entry.get("reason", "")):
        level = logging.DEBUG  # idle and frame timeouts are routine
    if not log.isEnabledFor(level):
        return
    try:
        message = say(entry) if say is not None else " ".join(
            [event, *(f"{k}={v}" for k, v in entry.items() if k not in _HIDDEN)])
    except (KeyError, TypeError):  # a field missing: still say what happened
        message = f"{event}: {json.dumps({k: v for k, v in entry.items() if k != 'prev'})}"
    log.log(level, message, extra={"audit": {k: v for k, v in entry.items()
                                             if k not in ("prev",)}})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` and, for lines
    that come from an audit entry, that entry under ``event``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        audit = getattr(record, "audit", None)
        if audit is not None:
            line["event"] = audit
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(level: str = "info", *, json_logs: bool = False) -> None:
    """The server's console: one handler on stderr at ``level``.

    Why stderr: the one line on stdout ("securefl server listening on ...") is what
    scripts and service managers wait for; everything else is the log."""
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        JsonFormatter() if json_logs else
        logging.Formatter("%(asctime)s UTC %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"))
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    wanted = getattr(logging, level.upper())
    # Other libraries' debug chatter (asyncio, TensorFlow) is not the operator's business.
    root.setLevel(max(wanted, logging.INFO))
    logging.getLogger("securefl").setLevel(wanted)
