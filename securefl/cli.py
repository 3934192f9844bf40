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
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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
}

Handler = Callable[[argparse.Namespace], int]


def exit_code_for(exc: errors.SecureFLError) -> int:
    """The most specific registered code for an error (subclasses before their bases)."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 9


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the built-in demonstration")
    p.add_argument("--hospitals", type=int, default=10, help="simulated hospitals (default 10)")
    p.add_argument("--params", type=int, default=1_000_000, help="model size in parameters")
    p.add_argument("--dropout", type=float, default=0.3, help="share of hospitals that vanish")
    p.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        from securefl.demo import run_demo

        return run_demo(
            hospitals=args.hospitals, params=args.params, dropout=args.dropout, seed=args.seed
        )

    p.set_defaults(func=run)


def _add_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="federation certificates: init, add-hospital, revoke, ...")
    p.add_argument("--dir", type=Path, default=Path("certs"), help="certificate folder")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = acts.add_parser("init", help="CA, server, admin and hospital certificates + kits")
    init.add_argument("--server-host", required=True,
                      help="host names/addresses of the server, comma-separated")
    init.add_argument("--hospitals", default="", help="hospital names, comma-separated")
    init.add_argument("--port", type=int, default=9095)
    add = acts.add_parser("add-hospital", help="certificate and kit for one more hospital")
    add.add_argument("name")
    rev = acts.add_parser("revoke", help="revoke a hospital's (or the admin's) certificate")
    rev.add_argument("name")
    acts.add_parser("renew", help="a fresh server certificate (90 days) and CRL")
    acts.add_parser("show", help="every certificate with its expiry and fingerprint")

    def run(args: argparse.Namespace) -> int:
        from securefl.certs import CertDir

        cd = CertDir(args.dir)
        if args.action == "init":
            names = [n.strip() for n in args.hospitals.split(",") if n.strip()]
            hosts = [h.strip() for h in args.server_host.split(",") if h.strip()]
            cd.init(hosts, names, port=args.port)
            print(f"federation created in {cd.root}; kits: "
                  + ", ".join(str(cd.kit(n)) for n in names))
        elif args.action == "add-hospital":
            kit = cd.add_hospital(args.name)
            print(f"kit for '{args.name}' in {kit}; add it to `hospitals` in server.toml")
        elif args.action == "revoke":
            cd.revoke(args.name)
            print(f"'{args.name}' revoked; the server refuses it from its next connection")
        elif args.action == "renew":
            cd.renew()
            print("server certificate and CRL renewed; restart the server")
        else:
            for row in cd.show():
                print(f"{row['role']:<9} {row['name']:<20} {row['status']:<8} "
                      f"expires {row['expires']}  {row['sha256']}")
        return 0

    p.set_defaults(func=run)


def _add_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="run the federation server")
    p.add_argument("--config", type=Path, required=True, help="server.toml")

    def run(args: argparse.Namespace) -> int:
        from securefl.server.main import run as run_server

        return run_server(args.config, args.argv)

    p.set_defaults(func=run)


def _add_client_net_actions(actions: argparse._SubParsersAction) -> None:
    """The hospital's network actions under ``securefl client --config FILE``."""
    get = actions.add_parser("get", help="download the current global model into data_dir")
    send = actions.add_parser("send", help="take part in a round with a trained update")
    what = send.add_mutually_exclusive_group(required=True)
    what.add_argument("--update", type=Path, help=".npy: local minus global weights")
    what.add_argument("--weights", type=Path, help=".npy: locally trained weights")
    send.add_argument("--samples", type=int, required=True, help="training images used")
    send.add_argument("--base-version", type=int, default=None,
                      help="global version trained on (default: the last `get`)")
    status = actions.add_parser("status", help="round phase and who is online")

    def run(args: argparse.Namespace) -> int:
        from securefl.client import commands

        return commands.run(commands.hospital, args)

    for p in (get, send, status):
        p.set_defaults(func=run)


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="a hospital: download the model, send an update")
    p.add_argument("--config", type=Path, required=True, help="the hospital's TOML file")
    actions = p.add_subparsers(dest="client_action", metavar="ACTION", required=True)
    _add_client_net_actions(actions)


def _add_admin(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("admin", help="operator actions (needs the admin certificate)")
    p.add_argument("--config", type=Path, required=True, help="admin.toml")
    p.add_argument("action", choices=["aggregate", "version", "count", "status", "close",
                                      "abort"])

    def run(args: argparse.Namespace) -> int:
        from securefl.client import commands

        return commands.run(commands.admin, args)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="securefl",
        description="Federated brain-tumour MRI classification with secure aggregation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_demo, _add_certs, _add_server, _add_client, _add_admin):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except errors.SecureFLError as exc:
        print(f"securefl: {exc.message}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("securefl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
