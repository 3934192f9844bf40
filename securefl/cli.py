"""The ``securefl`` command: everything the terminal UIs do, headless, for scripts and tests.

Subcommands are registered by small ``_add_*`` functions so each area keeps its own block.
Heavy imports (TensorFlow, Textual, asyncio servers) happen inside the handlers, so
``securefl --help`` and the admin commands start instantly.

Errors: every ``SecureFLError`` is printed as one plain sentence on stderr and mapped to a
distinct exit code (see ``EXIT_CODES``), so scripts can tell "server unreachable" from
"certificate rejected" without parsing text.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from securefl import errors

#: Exit codes scripts can rely on.  0 ok, 1 unexpected bug, 2 usage (argparse).
EXIT_CODES: dict[type[errors.SecureFLError], int] = {
    errors.ConfigError: 3,
    errors.DataError: 4,
    errors.CryptoError: 5,
    errors.TransportError: 6,
    errors.NotEnoughSurvivorsError: 8,
    errors.ProtocolError: 7,
    errors.ServerUnreachableError: 10,
    errors.CertificateRejectedError: 11,
    errors.StaleVersionError: 12,
    errors.UpdateAlreadySentError: 13,
    errors.AgentRunningError: 14,
    errors.AgentUnavailableError: 15,
    errors.HospitalBusyError: 16,
}

Handler = Callable[[argparse.Namespace], int]


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low``, refused in one line otherwise
    (walking it, ``data synth --train 0`` made an empty dataset and exited 0)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: at least {low}")
        return value
    return parse


def exit_code_for(exc: errors.SecureFLError) -> int:
    """The most specific registered code for an error (subclasses before their bases)."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 9


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="a throw-away federation on built-in synthetic scans, in one command",
        description="Creates certificates, synthetic MRI slices for N hospitals, a server on "
        "loopback and N headless hospitals in a temporary folder, then runs rounds of "
        "train -> secure aggregation -> evaluate and prints how the shared model compares "
        "with training alone.",
    )
    from securefl.demo.settings import DemoSettings

    d = DemoSettings()
    p.add_argument("--hospitals", type=int, default=None,
                   help=f"hospitals (default {d.hospitals}; with --secagg-only 6)")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help=f"federated rounds (default {d.rounds})")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help=f"local epochs per round (default {d.epochs})")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help=f"image side in pixels (default {d.image_size}: the demo's ten rounds "
                   "fit in three minutes on two cores)")
    p.add_argument("--train-images", type=int, default=d.train_images,
                   help=f"training scans per hospital (default {d.train_images})")
    p.add_argument("--test-images", type=int, default=d.test_images,
                   help=f"test scans per hospital (default {d.test_images})")
    p.add_argument("--keep", type=Path, help="build the federation in this folder")
    p.add_argument("--tui", action="store_true",
                   help="also open the administrator's app, watching the demo live")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the scans, the models and the masks: the same seed gives the "
                   "same accuracies (default 0)")
    p.add_argument("--secagg-only", action="store_true",
                   help="instead: one in-memory secure-aggregation round with simulated "
                   "hospitals (no network, no training)")
    p.add_argument("--params", type=int, default=1_000_000,
                   help="with --secagg-only: model size in parameters (default 1000000)")
    p.add_argument("--dropout", type=float, default=0.3,
                   help="with --secagg-only: share of hospitals that vanish mid-round "
                   "(default 0.3)")

    def run(args: argparse.Namespace) -> int:
        if args.secagg_only:
            from securefl.demo.secagg import DEFAULT_HOSPITALS, run_demo

            hospitals = DEFAULT_HOSPITALS if args.hospitals is None else args.hospitals
            return run_demo(hospitals=hospitals, params=args.params, dropout=args.dropout,
                            seed=args.seed)
        from securefl.demo import federated

        if args.hospitals is None:
            args.hospitals = d.hospitals

        if args.hospitals < 2 or args.rounds < 1 or args.epochs < 1:
            raise errors.ConfigError("the demo needs at least 2 hospitals, 1 round, 1 epoch")
        settings = federated.DemoSettings(hospitals=args.hospitals, rounds=args.rounds,
                                          epochs=args.epochs, image_size=args.image_size,
                                          train_images=args.train_images,
                                          test_images=args.test_images,
                                          seed=args.seed, keep=args.keep)
        if args.tui:
            federated.run_with_admin_app(settings)
        else:
            federated.run(settings)
        return 0

    p.set_defaults(func=run)


#: The server's port when ``certs init`` is not given one (``securefl.certs.DEFAULT_PORT``;
#: repeated here so ``--help`` imports no cryptography).
DEFAULT_PORT = 9095


def _port(text: str) -> int:
    """``--port``: a TCP port number, refused in one sentence otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 1 to 65535, not {text!r}")
    return value


def _add_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="federation certificates: init, add-hospital, revoke, ...")
    p.add_argument("--dir", type=Path, default=Path("certs"),
                   help="the federation's certificate folder, on the operator's machine "
                   "(default: certs)")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = acts.add_parser("init", help="CA, server, admin and hospital certificates + kits")
    init.add_argument("--server-host", required=True,
                      help="host names/addresses of the server, comma-separated")
    init.add_argument("--hospitals", default="",
                      help="hospital names, comma-separated: one certificate and kit each "
                      "(default: none; add them later with add-hospital)")
    init.add_argument("--port", type=_port, default=DEFAULT_PORT,
                      help="TCP port the server listens on and every kit connects to "
                      f"(default {DEFAULT_PORT}; change it later with set-server)")
    add = acts.add_parser("add-hospital", help="certificate and kit for one more hospital")
    add.add_argument("name", help="the new hospital's name: 1-64 characters from a-z, 0-9, "
                     "'-', '_', '.' (it names its certificate and its kit folder)")
    rev = acts.add_parser("revoke", help="revoke a hospital's certificate (it leaves the member "
                          "list), the admin's, or the server's ('server': a new one is issued)")
    rev.add_argument("name", help="a hospital's name, 'admin' or 'server'")
    ren = acts.add_parser("renew", help="a fresh server certificate (90 days) and CRL, or "
                          "with a name a fresh admin or hospital certificate (1 year)")
    ren.add_argument("name", nargs="?", help="'admin' or a hospital (default: the server)")
    acts.add_parser("show", help="every certificate with its expiry and fingerprint",
                    description="One line per certificate in the folder (CA, server, admin, "
                    "every hospital ever issued): role, name, valid or revoked, expiry (UTC) "
                    "and the SHA-256 fingerprint to compare over the phone when handing "
                    "over a kit.")
    acts.add_parser("members", help="sign a fresh member list (every hospital not revoked) "
                    "and copy it into every kit")
    move = acts.add_parser(
        "set-server", help="move the server to other host names/addresses or another port "
        "(needs ca.key)",
        description="Reissues the server certificate for the new names and rewrites "
        "server.toml, admin.toml, federation.json and every kit's hospital.toml (host and "
        "port only).  Then copy server.pem, server.key and server.toml to the server and "
        "restart it, and give each hospital its new hospital.toml (docs/QUICKSTART.md, "
        "section 5).")
    move.add_argument("--host", dest="server_host", default=None,
                      help="the server's new host names/addresses, comma-separated; the "
                      "first is the one kits connect to (default: keep the current ones)")
    move.add_argument("--port", type=_port, default=None,
                      help="the server's new TCP port (default: keep the current one)")

    def run(args: argparse.Namespace) -> int:
        from securefl.certs import CertDir

        cd = CertDir(args.dir)
        if args.action == "init":
            names = [n.strip() for n in args.hospitals.split(",") if n.strip()]
            hosts = [h.strip() for h in args.server_host.split(",") if h.strip()]
            listen = cd.init(hosts, names, port=args.port)
            print(f"federation created in {cd.root}; kits: "
                  + ", ".join(str(cd.kit(n)) for n in names))
            from securefl.config import read_toml

            admin = read_toml(cd.root / "admin.toml")  # what every kit was written with
            print(f"the kits and admin.toml connect to {admin['host']}:{admin['port']}: "
                  f"start `securefl server --config {cd.root / 'server.toml'}` on the "
                  "machine that name reaches (docs/QUICKSTART.md, section 2)")
            if listen == "0.0.0.0":
                print(f"warning: none of {', '.join(hosts)} is an address of this machine, so "
                      f"{cd.root / 'server.toml'} listens on every interface (host = "
                      "\"0.0.0.0\"): on the server, set host to the address hospitals "
                      "connect to", file=sys.stderr)
        elif args.action == "add-hospital":
            kit = cd.add_hospital(args.name)
            print(f"kit for '{args.name}' in {kit}; add it to `hospitals` in server.toml and "
                  f"copy {cd.members.name} to the server")
        elif args.action == "revoke":
            cd.revoke(args.name)
            if args.name == "server":
                print("server certificate revoked and a new one issued: copy server.pem, "
                      "server.key and crl.pem to the server and restart it")
            elif args.name == "admin":
                print("admin certificate revoked: copy crl.pem to the server; `renew admin` "
                      "issues a new one")
            else:
                print(f"'{args.name}' revoked and off the member list: copy crl.pem and "
                      f"{cd.members.name} to the server (the server refuses it from its next "
                      "connection on)")
        elif args.action == "set-server":
            if args.server_host is None and args.port is None:
                raise errors.ConfigError("give --host, --port or both: the server's new "
                                         "names or port")
            new_hosts = ([h.strip() for h in args.server_host.split(",") if h.strip()]
                         if args.server_host is not None else None)
            if new_hosts == []:
                raise errors.ConfigError("--host needs at least one name or address")
            listen = cd.set_server(new_hosts, args.port)
            meta = json.loads((cd.root / "federation.json").read_text())
            kits = sorted(p.parent.name for p in (cd.root / "kits").glob("*/hospital.toml"))
            print(f"server certificate reissued for {', '.join(meta['server_hosts'])}, port "
                  f"{meta['port']}; rewrote server.toml, admin.toml, federation.json and the "
                  f"kits of {', '.join(kits) or 'no hospital'}.  Next: copy server.pem, "
                  "server.key and server.toml to the server (open the new port in its "
                  "firewall) and restart it; give each hospital its new hospital.toml, or "
                  "have it set host and port in its own")
            if listen == "0.0.0.0":
                print(f"warning: none of {', '.join(meta['server_hosts'])} is an address of "
                      f"this machine, so {cd.root / 'server.toml'} listens on every interface "
                      "(host = \"0.0.0.0\"): on the server, set host to the address "
                      "hospitals connect to", file=sys.stderr)
        elif args.action == "members":
            listed = cd.write_members()
            print(f"member list number {listed.number} ({len(listed.members)} hospitals) in "
                  f"{cd.members} and every kit: copy it to the server")
        elif args.action == "renew":
            where = cd.renew(args.name)
            if args.name is None:
                print("server certificate and CRL renewed; restart the server")
            elif args.name == "admin":
                print(f"admin certificate renewed in {where}")
            else:
                print(f"certificate of '{args.name}' renewed in its kit {where}: copy "
                      "hospital.pem and hospital.key to that hospital, and "
                      f"{cd.members.name} to the server")
        else:
            for row in cd.show():
                print(f"{row['role']:<9} {row['name']:<20} {row['status']:<8} "
                      f"expires {row['expires']}  {row['sha256']}")
        return 0

    p.set_defaults(func=run)


#: ``--verify-audit`` given without a file: the one server.toml names.
_CONFIGURED = Path("\0configured")


def _verify_audit(config_path: Path | None, given: Path) -> int:
    """Why a command and not only the start-up check: an operator checks a log (or a
    backup copy of one) without starting a server, and a script needs the exit code."""
    from securefl import config
    from securefl.server import audit

    if given == _CONFIGURED:
        if config_path is None:
            raise errors.ConfigError("--verify-audit needs --config server.toml (the log it "
                                     "names), or the audit log file to check: "
                                     "--verify-audit FILE")
        path = Path(config.load(config_path, config.ServerSettings).audit_log)
    else:
        path = given
    try:
        found = audit.check(path)
    except FileNotFoundError:
        raise errors.DataError(f"there is no audit log at {path}: give the file to check, "
                               "or the server.toml that names it") from None
    except IsADirectoryError:
        raise errors.DataError(f"{path} is a folder, not an audit log: give the audit log "
                               "file (audit.jsonl)") from None
    except OSError as exc:
        raise errors.DataError(f"cannot read the audit log {path} ({exc.strerror}): run "
                               "this as a user who may read it") from None
    if not found.intact:
        raise errors.DataError(found.sentence())
    print(found.sentence())
    print(f"hash of the newest entry: {found.head}")
    print("(the next entry carries it as \"prev\": note it down, and a later intact check "
          "whose log still holds it shows that nothing up to here was changed)")
    return 0


def _add_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "server", help="run the federation server",
        description="Serves until Ctrl-C or SIGTERM.  The console (stderr) says what an "
        "operator needs: listening, rounds opened, closed, published or failed, refused "
        "connections with the reason, certificate and revocation-list expiry warnings.  "
        "Every event is also in the hash-chained audit log (audit_log in server.toml).")
    p.add_argument("--config", type=Path,
                   help="server.toml from the certificate folder (required, except with "
                   "--verify-audit FILE)")
    p.add_argument("--verify-audit", nargs="?", type=Path, const=_CONFIGURED, default=None,
                   metavar="FILE", help="check the audit log's hash chain and exit (the "
                   "server is not started): server.toml's audit_log, or FILE (a backup "
                   "copy); exit 0 when intact, 4 naming every damaged line otherwise")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default="info", help="least important console messages shown; debug "
                   "adds every connection and round step (default info)")
    p.add_argument("--json-logs", action="store_true",
                   help="console messages as one JSON object per line, for a log collector")

    def run(args: argparse.Namespace) -> int:
        if args.verify_audit is not None:
            return _verify_audit(args.config, args.verify_audit)
        if args.config is None:
            p.error("the following arguments are required: --config")
        from securefl.server.main import run as run_server

        return run_server(args.config, args.argv, log_level=args.log_level,
                          json_logs=args.json_logs)

    p.set_defaults(func=run)


def _add_client_net_actions(actions: argparse._SubParsersAction) -> None:
    """The hospital's network actions under ``securefl client --config FILE``."""
    get = actions.add_parser(
        "get", help="download the current global model into state_dir",
        description="Downloads the federation's current global model (its sha256 checked), "
        "keeps it in state_dir and, with an [ml] table, loads it into the local model, "
        "ready to evaluate or to train for the next round.")
    get.add_argument("--replace-trained", action="store_true",
                     help="replace a local model that was trained on the current version but "
                     "not sent yet (without it, get refuses rather than lose that training)")
    send = actions.add_parser("send", help="take part in a round with a trained update")
    what = send.add_mutually_exclusive_group()
    what.add_argument("--update", type=Path,
                      help=".npy: local minus global weights (default: the trained local model)")
    what.add_argument("--weights", type=Path, help=".npy: locally trained weights")
    send.add_argument("--samples", type=int, help="training images used (with --update or "
                      "--weights)")
    send.add_argument("--base-version", type=int, default=None,
                      help="global version trained on; must be the version of the last "
                           "`get` (its model's sha256 is signed into the round), which is "
                           "also the default")
    status = actions.add_parser(
        "status", help="round phase and who is online",
        description="Asks the server for the current version, the round and its phase, "
        "which hospitals are online, how many joined and sent, and whom a retried round "
        "waits for.")

    def run(args: argparse.Namespace) -> int:
        from securefl.client import commands

        return commands.run(commands.hospital, args)

    for p in (get, send, status):
        p.set_defaults(func=run)


#: Most entries ``securefl client ... log --limit`` prints (the log keeps a few thousand).
MAX_LOG_LIMIT = 10_000


def _log_limit(text: str) -> int:
    """``--limit``: a whole number of entries, refused in one sentence otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LOG_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of entries from 1 to {MAX_LOG_LIMIT}, not {text!r}")
    return value


def _add_client_log_action(actions: argparse._SubParsersAction) -> None:
    """``log``: the hospital's own record of its gets, trainings and sends (no network)."""
    p = actions.add_parser("log", help="what this hospital did and refused, newest last "
                           "(its own log, kept in state_dir; no server needed)")
    p.add_argument("--limit", type=_log_limit, default=20,
                   help=f"entries to show, 1 to {MAX_LOG_LIMIT} (default 20)")

    def run(args: argparse.Namespace) -> int:
        from securefl.client import commands

        return commands.show_log(args)

    p.set_defaults(func=run)


def _schedule_round(text: str) -> int:
    """``approve``/``skip`` ROUND: a scheduled round's number, refused in one sentence."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a scheduled round's number (1 or more, `agent-status` shows the pending "
            f"one), not {text!r}")
    return value


def _add_client_agent_actions(actions: argparse._SubParsersAction) -> None:
    """The hospital agent and how people talk to it (``securefl.client.agent``)."""
    agent = actions.add_parser(
        "agent", help="run the hospital's agent: takes part in the rounds the server opens",
        description="A long-running service (run it under systemd, docs/QUICKSTART.md): keeps "
        "one connection to the server and, for each round the server opens on its schedule, "
        "gets the global model, trains, takes part in the masked round, downloads and "
        "evaluates the published version.  [agent] in hospital.toml decides: participation "
        "= \"approve\" (default: a person approves each round, in the app or with `approve`) "
        "or \"auto\", a time window, rounds per day, attempts per version.  While it runs, "
        "train, get and send go through it.  Stops cleanly on SIGTERM or Ctrl-C.")
    status = actions.add_parser("agent-status", help="what the running agent is doing, the "
                                "round waiting for approval and its recent rounds")
    status.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    approve = actions.add_parser("approve", help="let the running agent take part in the "
                                 "round waiting for approval")
    skip = actions.add_parser("skip", help="tell the running agent to sit out the round "
                              "waiting for approval (the server hears 'declined')")
    for p in (approve, skip):
        p.add_argument("round", nargs="?", type=_schedule_round, default=None,
                       help="the scheduled round's number (default: the pending one)")
    stop = actions.add_parser("agent-stop", help="stop the running agent cleanly (as SIGTERM "
                              "does; a service manager may start it again)")

    def run_agent(args: argparse.Namespace) -> int:
        from securefl.client.agent.service import run_agent
        from securefl.client.hospital import Hospital

        return run_agent(Hospital.from_file(args.config))

    def talk(args: argparse.Namespace) -> int:
        from securefl.client.agent import cli_text

        return cli_text.run(args)

    agent.set_defaults(func=run_agent)
    for p in (status, approve, skip, stop):
        p.set_defaults(func=talk)


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="a hospital: the app, or train, evaluate, classify, "
                       "get, send, status, log, agent and the agent's actions")
    p.add_argument("--config", type=Path, help="hospital.toml from the kit (with no ACTION "
                   "the app asks for it)")
    p.add_argument("--hospital", help="the hospital name to check against the kit's "
                   "certificate before anything runs (with no ACTION the app asks for it when "
                   "not given)")
    actions = p.add_subparsers(dest="client_action", metavar="ACTION", required=False)
    _add_client_ml_actions(actions)
    _add_client_net_actions(actions)
    _add_client_log_action(actions)
    _add_client_agent_actions(actions)

    def run_app(args: argparse.Namespace) -> int:
        # Every action the parser has: a hand-kept list had left out the agent's.
        refused = _needs_terminal("client", ", ".join(actions.choices))
        if refused is not None:
            return refused
        from securefl.tui.hospital.app import run_hospital_app

        return run_hospital_app(args.config, args.hospital)

    p.set_defaults(func=run_app)


#: ``securefl admin ACTION``: what each does (the help lists them; QUICKSTART shows each
#: one's output, generated by docs/generate_samples.py).
ADMIN_ACTIONS = {
    "status": "version, round and phase, who is online, joined and sent",
    "count": "masked updates collected in the current round",
    "hospitals": "every hospital: registered, online, in the round, sent, last seen, "
                 "certificate expiry",
    "close": "close the round's enrolment now (needs max(min_clients, colluders + 2) "
             "joined)",
    "aggregate": "unmask the round's sum and publish the next version",
    "abort": "give the round up; its hospitals send again",
    "version": "the current global version",
    "history": "the published versions, oldest first",
    "audit": "the newest entries of the server's audit log",
    "schedule": "the [schedule]: next round, the open round's phase and each hospital in it",
    "pause": "auto schedule: open no further rounds (an open one runs on)",
    "resume": "auto schedule: open rounds again as scheduled",
    "open": "auto schedule: open a round now",
}


def _needs_terminal(command: str, actions: str) -> int | None:
    """Exit code 2 with a sentence when an app would start without a terminal.

    Why: a full-screen app on a pipe or in a service waits for keys that never come; the
    command hung instead of saying what to run."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        return None
    print(f"securefl: `securefl {command}` without an ACTION opens the terminal app, and "
          f"this is not a terminal (input or output is redirected): give an ACTION, one of "
          f"{actions}", file=sys.stderr)
    return 2


def _add_admin(sub: argparse._SubParsersAction) -> None:
    listing = "\n".join(f"  {name:<10} {what}" for name, what in ADMIN_ACTIONS.items())
    p = sub.add_parser(
        "admin", help="operator actions (needs the admin certificate)",
        description="The operator's view of the federation.  With no ACTION, in a terminal: "
        "the administrator's app.  Actions print tables for people; --json prints JSON "
        "(status, schedule: one object; hospitals, history, audit: one object per line) for "
        "scripts.\n\nactions:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True,
                   help="admin.toml from the certificate folder (no default)")
    p.add_argument("action", nargs="?", default=None, choices=list(ADMIN_ACTIONS),
                   metavar="ACTION",
                   help="one of: " + ", ".join(ADMIN_ACTIONS) + " (default: none, which "
                   "opens the administrator's terminal app)")
    p.add_argument("--json", action="store_true",
                   help="print JSON for scripts instead of tables")
    p.add_argument("--limit", type=_log_limit, default=50,
                   help="history and audit: how many of the newest to show (default 50)")

    def run(args: argparse.Namespace) -> int:
        if args.action is None:
            refused = _needs_terminal("admin", ", ".join(ADMIN_ACTIONS))
            if refused is not None:
                return refused
            from securefl.tui.admin.app import run_admin_app

            return run_admin_app(args.config)
        from securefl.client import commands

        return commands.run(commands.admin, args)

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- ML (issue 4)


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="built-in data: synthetic MRI-like slices for demos and tests")
    actions = p.add_subparsers(dest="data_action", metavar="ACTION", required=True)
    s = actions.add_parser(
        "synth",
        help="write synthetic brain MRI slices (4 classes) for N non-IID hospitals",
        description="Synthetic slices built on the MNI152 template with painted lesions. "
        "For demos and tests only: not real patients, no clinical value.",
    )
    s.add_argument("--out", type=Path, required=True,
                   help="output folder (no default): one hospital_N folder per hospital, "
                   "hospital_1 to hospital_N, each with Training/<class>/ and "
                   "Testing/<class>/")
    s.add_argument("--hospitals", type=_at_least(1), default=3,
                   help="number of hospitals (default 3)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same images (default 0)")
    s.add_argument("--train", type=_at_least(1), default=600,
                   help="training images per hospital (default 600)")
    s.add_argument("--test", type=_at_least(1), default=200,
                   help="testing images per hospital (default 200)")
    s.add_argument("--size", type=_at_least(32), default=128,
                   help="image side in pixels (default 128, at least 32)")
    s.add_argument("--format", choices=("jpg", "png"), default="jpg",
                   help="image file format: jpg (smaller) or png (lossless) (default jpg)")

    def run(args: argparse.Namespace) -> int:
        from securefl.ml.synth import synthesize

        tty = sys.stderr.isatty()

        def progress(done: int, total: int) -> None:
            # Redrawn in place on a terminal; a line each in a log file (no carriage returns).
            if done == total or done % 200 == 0:
                print(f"\r{done}/{total} images" if tty else f"{done}/{total} images",
                      end="" if tty else "\n", file=sys.stderr, flush=True)

        summary = synthesize(
            args.out, hospitals=args.hospitals, seed=args.seed,
            train_per_hospital=args.train, test_per_hospital=args.test,
            size=args.size, image_format=args.format, progress=progress,
        )
        if tty:
            print(file=sys.stderr)
        from securefl.ml.settings import MLSettings

        # What `train` will refuse with the default settings, said now (walking it, --train
        # 200 made a class of 5 scans that training then refused).
        needs = MLSettings.model_fields["min_validation_per_class"].default + 1
        for name, info in summary["hospitals"].items():
            counts = ", ".join(f"{c} {n}" for c, n in sorted(info["Training"].items()))
            print(f"{args.out / name}: training {counts}")
            few = sorted(c for c, n in info["Training"].items() if n < needs)
            if few:
                print(f"note: {name} has fewer than {needs} training scans of "
                      f"{', '.join(few)}, which `train` refuses with the default settings "
                      f"([ml] min_validation_per_class + 1): make more with a larger --train",
                      file=sys.stderr)
        return 0

    s.set_defaults(func=run)


def _warn_skipped(skipped: Any, scans_dir: Path) -> None:
    """Files the data loader did not use, on stderr (stdout may be JSON)."""
    from securefl.ml.data import describe_skipped

    line = describe_skipped(skipped, scans_dir)
    if line:
        print(f"securefl: warning: {line}", file=sys.stderr)


def why_this_many_epochs(stopped_early: bool, epochs_run: int, most: int) -> str:
    """Why training ran the epochs it ran.  Keras marks a stop on the last allowed epoch
    as early too; walking it, "stopped early" was printed after every epoch had run."""
    if stopped_early and epochs_run < most:
        return "stopped early: the validation loss had stopped improving"
    return f"at most {most} epochs"


def _add_client_ml_actions(actions: argparse._SubParsersAction) -> None:
    """The hospital's local ML actions under ``securefl client --config FILE``."""
    t = actions.add_parser("train", help="train the local model on scans_dir/Training")
    t.add_argument("--epochs", type=int, help="override the settings' epochs")
    e = actions.add_parser(
        "evaluate", help="score the local model on its validation scans (or --split testing)")
    e.add_argument("--split", choices=("validation", "testing"), default="validation",
                   help="validation: the scans held out of scans_dir/Training (default, what "
                   "to look at every round); testing: scans_dir/Testing (figures to report, "
                   "never for choosing settings)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    c = actions.add_parser("classify", help="calibrated class probabilities for one scan")
    c.add_argument("image", type=Path, help="a JPEG or PNG scan")
    c.add_argument("--json", action="store_true", help="print the answer as JSON")

    def hospital(args: argparse.Namespace) -> Any:
        """The one owner of the hospital's state (``securefl.client.hospital``): the app and
        ``send`` then see exactly what this command trained."""
        from securefl.client.hospital import Hospital

        h = Hospital.from_file(args.config)
        if getattr(args, "epochs", None):
            h.ml = h.ml.model_copy(update={"epochs": args.epochs})
        return h

    def run_train(args: argparse.Namespace) -> int:
        from securefl.client.commands import training_printer

        h = hospital(args)
        from securefl.client.agent.control import refuse_if_running

        refuse_if_running(h.state_dir, "train")
        state = h.local_state()
        base = state.base_version
        if state.trained and base is not None and h.unsent_training(base) is not None:
            # Walking it: only a docstring said that a second train goes on from the first.
            print(f"continuing from the model this hospital already trained on version "
                  f"{base} (its update is not sent yet): this adds epochs to that training; "
                  "to start again from the downloaded global model, run `get "
                  "--replace-trained` first")
        printer = training_printer()
        stop = _TrainingStop()
        try:
            result = h.train(progress=printer, cancel=stop.event)
        finally:
            printer.done()
            stop.restore()
        if result.cancelled:
            print(f"securefl: train was stopped by {stop.cause} before it finished; the model "
                  f"file is unchanged ({h.ml.model_path}): run train again", file=sys.stderr)
            return stop.code
        if stop.event.is_set():
            # The stop came after the last batch (while the model was being calibrated or
            # saved): the run was complete, so it was kept, and the line above was wrong.
            print(f"securefl: {stop.cause} came after the training had finished, so nothing "
                  "was stopped: the trained model was saved in full", file=sys.stderr)
        start = (f"from global version {base}" if base is not None
                 else "from a new model (no global model downloaded yet)")
        # The figures of the epoch whose weights were kept (the last epoch's described a
        # model that early stopping had thrown away).
        kept = result.best_epoch - 1 if result.best_epoch else -1
        print(
            f"trained {start} on {result.num_samples} scans in {result.seconds:.1f} s; "
            f"training loss {result.history['loss'][kept]:.4f}, accuracy "
            f"{result.history['accuracy'][kept]:.3f}"
            + (f" (epoch {result.best_epoch}, the one kept)" if result.best_epoch else "")
            + f"; model saved to {h.ml.model_path}"
        )
        if result.best_epoch:
            why = why_this_many_epochs(result.stopped_early, result.epochs_run, h.ml.epochs)
            print(f"kept epoch {result.best_epoch} of {result.epochs_run} ({why}): validation "
                  f"loss {result.history['val_loss'][result.best_epoch - 1]:.4f} on "
                  f"{result.validation_samples} validation scans; probabilities calibrated "
                  f"with temperature {result.temperature:.2f}")
        _warn_skipped(result.skipped, h.ml.scans_dir)
        if base is not None:
            print("next: `send` this update to the round")
        return 0

    def run_evaluate(args: argparse.Namespace) -> int:
        h = hospital(args)
        report = h.evaluate(args.split)
        print(json.dumps(report.to_dict()) if args.json else
              f"{h.model_label()}, on this hospital's {report.format()}")
        _warn_skipped(report.skipped, h.ml.scans_dir)
        return 0

    def run_classify(args: argparse.Namespace) -> int:
        from securefl.ml.settings import clinical_name

        answer = hospital(args).classify(args.image)
        if args.json:
            print(json.dumps(answer.to_dict()))
            return 0
        for name, p in sorted(answer.probabilities.items(), key=lambda kv: -kv[1]):
            print(f"{clinical_name(name):<17} {p:6.1%}")
        how = (f"calibrated, temperature {answer.temperature:.2f}" if answer.calibrated
               else "not calibrated")
        print(f"model: {answer.model} ({how})")
        for line in answer.notices():
            print(line)
        print("Decision support only: a clinician makes the diagnosis.")
        return 0

    t.set_defaults(func=run_train)
    e.set_defaults(func=run_evaluate)
    c.set_defaults(func=run_classify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="securefl",
        description="Federated brain-tumour MRI classification with secure aggregation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_demo, _add_data, _add_certs, _add_server, _add_client, _add_admin):
        add(sub)
    return parser


#: Client actions that only read (a model, scans) and run without an event loop: SIGTERM
#: ends them at once, with a sentence (``train`` stops between batches instead, see
#: ``_TrainingStop``; ``get`` finishes first, see ``_GetFinishesFirst``; ``send`` cancels
#: its task, see ``securefl.client.commands.run``).
_READ_ONLY = frozenset({"evaluate", "classify"})


def _end_on_sigterm(action: str) -> None:
    """Python's default ended the process with status 143 and no word.  Raising from the
    handler instead would unwind in the middle of TensorFlow's work, whose threads then
    ran on into the interpreter's shutdown (seen: ``free(): invalid next size``, status
    -6); nothing of these actions needs saving, so the process ends here."""
    import signal

    def end(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            sys.stderr.write(f"securefl: {action} was stopped by a termination signal "
                             "before it finished; nothing was changed: run it again\n")
            sys.stderr.flush()
        os._exit(143)

    signal.signal(signal.SIGTERM, end)


class _TrainingStop:
    """Ctrl-C or SIGTERM during ``train``: the training stops at the end of its batch and
    keeps nothing (the model file stays as it was), like Cancel in the app.

    Why not Python's defaults: SIGTERM ended the process with status 143 and no word, and
    the hospital's log had no entry; KeyboardInterrupt raised in the middle of TensorFlow's
    work left its threads running into the interpreter's shutdown (seen: ``free(): invalid
    next size``, status -6).  A second signal stops at once."""

    def __init__(self) -> None:
        import signal
        import threading

        self.event = threading.Event()
        self.code, self.cause = 0, ""
        self._old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig, old in self._old.items():
            if old is not signal.SIG_IGN:  # a background job's ignored Ctrl-C stays ignored
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        import signal

        code = 130 if signum == signal.SIGINT else 143
        if self.event.is_set():
            with contextlib.suppress(OSError):
                sys.stderr.write("securefl: stopped at once; the model file is unchanged\n")
            os._exit(code)
        self.code = code
        self.cause = "Ctrl-C" if code == 130 else "a termination signal"
        self.event.set()
        again = "press Ctrl-C again" if code == 130 else "send the signal again"
        with contextlib.suppress(OSError):
            sys.stderr.write("securefl: stopping the training at the end of this batch, "
                             f"keeping nothing ({again} to stop at once)\n")

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)


class _GetFinishesFirst:
    """Ctrl-C, SIGTERM or SIGHUP during ``get``: the download and the model made from it
    finish first (seconds to a fine-tuning epoch), then the command says so.

    Why: a SIGTERM or a closed terminal ended ``get`` after ``global.json`` named the new
    version and before the model was made from it, without a word; the next ``train``
    went on from the old model and ``send`` labelled its update with the new version
    (found walking it).  A second Ctrl-C stops at once, as the person asks."""

    def __init__(self) -> None:
        import signal

        self.cause = ""
        self._old = {sig: signal.getsignal(sig)
                     for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        for sig, old in self._old.items():
            if old is not signal.SIG_IGN:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        import signal

        if self.cause and signum == signal.SIGINT:
            raise KeyboardInterrupt
        causes: dict[int, str] = {signal.SIGINT: "Ctrl-C",
                                  signal.SIGHUP: "a hang-up (the terminal closed)"}
        self.cause = causes.get(signum, "a termination signal")
        with contextlib.suppress(OSError):
            sys.stderr.write(f"securefl: {self.cause}: get stops once this download and "
                             "the model made from it are complete (Ctrl-C again stops at "
                             "once, and then run get --replace-trained)\n")

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)

    def said(self) -> None:
        if self.cause:
            with contextlib.suppress(OSError):
                sys.stderr.write(f"securefl: stopped after {self.cause}, once get had "
                                 "finished: what it printed above is complete\n")


def _check_hospital_name(path: Path, name: str) -> None:
    """``--hospital`` with an action: a script that names one hospital and passes another's
    kit (``--hospital south`` with north's hospital.toml) must not train or send as north
    without a word, so the name is checked as the app's sign-in checks it."""
    from securefl import config
    from securefl.certs import load_credential

    settings = config.load(path, config.ClientSettings)
    actual = load_credential(settings.cert, settings.key).name
    if name.strip() != actual:
        raise errors.ConfigError(
            f"{path}'s certificate belongs to '{actual}', not '{name.strip()}' (--hospital): "
            "check the name, or give your own hospital's hospital.toml; nothing was done")


def _check_role(command: str, path: Path) -> None:
    """The administrator's settings given to ``client``, or a hospital's to ``admin``.

    Why checked here: walking it, ``client --config admin.toml train`` was told to add an
    [ml] table to admin.toml, and ``status`` reached the server before the mix-up showed.
    The certificate says whose settings these are; any other fault in the file is left to
    the action, which names it in its own words."""
    from securefl import config
    from securefl.certs import load_credential
    from securefl.crypto.pki import Role

    try:
        settings = config.load(path, config.ClientSettings)
        cred = load_credential(settings.cert, settings.key)
        role, name = cred.role, cred.name
    except (errors.SecureFLError, ValueError):
        return
    if command == "client" and role is Role.ADMIN:
        raise errors.ConfigError(
            f"{path} holds the administrator's certificate, not a hospital's: `securefl "
            "client` takes a hospital kit's hospital.toml (kits/NAME/hospital.toml), and the "
            f"administrator's actions run as `securefl admin --config {path} ...`; nothing "
            "was done")
    if command == "admin" and role is not Role.ADMIN:
        raise errors.ConfigError(
            f"{path} holds the certificate of {role} '{name}', not the administrator's: "
            "`securefl admin` takes the administrator's admin.toml (in the certificate "
            f"folder), and this hospital's actions run as `securefl client --config {path} "
            "...`; nothing was done")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    action = getattr(args, "client_action", None)
    if args.command == "client" and action is not None and args.config is None:
        parser.error(f"securefl client {action} needs --config hospital.toml")
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    if args.command == "client" and action in _READ_ONLY:
        _end_on_sigterm(action)
    getting = _GetFinishesFirst() if args.command == "client" and action == "get" else None
    try:
        if action is not None and getattr(args, "hospital", None):
            _check_hospital_name(args.config, args.hospital)
        if (args.command == "admin" or (args.command == "client" and action is not None)) \
                and isinstance(getattr(args, "config", None), Path):
            _check_role(args.command, args.config)
        try:
            code = func(args)
        finally:
            if getting is not None:  # main() also runs in-process (tests, scripts)
                getting.restore()
        if getting is not None:
            getting.said()
        return code
    except errors.SecureFLError as exc:
        print(f"securefl: {exc.message}", file=sys.stderr)
        return exit_code_for(exc)
    except BrokenPipeError:
        # The reader went away (`securefl admin status | head`): not an error of ours.
        # Python would print a second traceback flushing stdout at exit: point it nowhere.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # The last net for a file or folder the system refused (read-only, full, a file
        # where a folder belongs): one sentence naming it, never a traceback.
        where = f" {exc.filename}" if exc.filename else ""
        print(f"securefl: the system refused to read or write{where} "
              f"({exc.strerror or exc}), so the command stopped there: check that the path "
              "is right, writable and has free space, then run it again", file=sys.stderr)
        return EXIT_CODES[errors.DataError]
    except KeyboardInterrupt:
        print("securefl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
