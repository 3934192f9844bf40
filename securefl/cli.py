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

from securefl import errors

#: Exit codes scripts can rely on.  0 ok, 1 unexpected bug, 2 usage (argparse).
EXIT_CODES: dict[type[errors.SecureFLError], int] = {
    errors.ConfigError: 3,
    errors.DataError: 4,
    errors.CryptoError: 5,
    errors.TransportError: 6,
    errors.NotEnoughSurvivorsError: 8,
    errors.ProtocolError: 7,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="securefl",
        description="Federated brain-tumour MRI classification with secure aggregation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_demo,):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
