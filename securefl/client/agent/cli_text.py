"""``agent-status``, ``approve``, ``skip`` and ``agent-stop``: the CLI's side of the socket."""

from __future__ import annotations

import argparse
import json
from typing import Any

from securefl import config
from securefl.client.agent import control
from securefl.errors import DataError
from securefl.ml.settings import clinical_name


def _progress(status: dict[str, Any]) -> str:
    p = status.get("progress")
    return f" ({p:.0%})" if isinstance(p, int | float) and status.get("state") == "training" \
        else ""


def scans_line(counts: dict[str, dict[str, int]]) -> str:
    """"train glioma 50, meningioma 40 ...; validation ..." for the pending round."""
    parts = []
    for split in ("train", "validation"):
        table = counts.get(split) or {}
        if table:
            parts.append(f"{split} " + ", ".join(f"{clinical_name(c)} {n}"
                                                 for c, n in table.items())
                         + f" ({sum(table.values())})")
    return "; ".join(parts) or "no scans counted"


def round_line(r: dict[str, Any]) -> str:
    """One recent round for people."""
    acc = r.get("balanced_accuracy")
    what = r.get("outcome", "?")
    if r.get("version") is not None and what == "published":
        what = f"published v{r['version']}"
    if acc is not None:
        what += f", balanced accuracy {acc:.3f}"
    if r.get("reason") and r["reason"] != r.get("outcome"):
        what += f" [{r['reason']}]"
    when = (r.get("time") or "").replace("T", " ")[:16]
    return f"  round {r['schedule_round']:<5} base v{r['base_version']:<4} {when:<16}  {what}"


def status_lines(status: dict[str, Any]) -> list[str]:
    lines = [f"agent: {status['state']}{_progress(status)} — {status['detail']}",
             f"participation: {status.get('participation')}"
             + (f", window {status['window']}" if status.get("window") else "")
             + f"; pid {status.get('pid')}"]
    pending = status.get("pending")
    if pending:
        lines.append(f"waiting for approval: round {pending['schedule_round']} on version "
                     f"{pending['base_version']} (deadline {pending.get('deadline') or '-'}); "
                     f"it would train on: {scans_line(pending.get('scans') or {})}")
        lines.append(f"  approve: securefl client --config hospital.toml approve "
                     f"{pending['schedule_round']}   (or skip)")
    recent = status.get("recent") or []
    if recent:
        lines.append("recent rounds:")
        lines += [round_line(r) for r in recent[-5:]]
    return lines


def run(args: argparse.Namespace) -> int:
    state_dir = config.load(args.config, config.ClientSettings).state_dir
    action = args.client_action
    if action == "agent-status":
        status = control.call_sync(state_dir, "status")
        print(json.dumps(status) if args.json else "\n".join(status_lines(status)))
        return 0
    if action == "agent-stop":
        control.call_sync(state_dir, "stop")
        print("the agent is stopping (a round in progress is left; its send record says "
              "how far it got)")
        return 0
    n = args.round
    if n is None:
        pending = control.call_sync(state_dir, "status").get("pending")
        if not pending:
            raise DataError("no round is waiting for approval: `agent-status` shows what the "
                            "agent is doing")
        n = pending["schedule_round"]
    reply = control.call_sync(state_dir, action, schedule_round=n)
    if not reply.get("ok"):
        raise DataError(reply.get("error") or "the agent refused")
    print(f"round {n} approved: the agent trains and takes part" if action == "approve"
          else f"round {n} skipped: the agent sits it out and tells the server 'declined'")
    return 0



