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
import json
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
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--hospitals", type=int, default=3, help="number of hospitals (default 3)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same images (default 0)")
    s.add_argument("--train", type=int, default=600, help="training images per hospital")
    s.add_argument("--test", type=int, default=200, help="testing images per hospital")
    s.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    s.add_argument("--format", choices=("jpg", "png"), default="jpg")

    def run(args: argparse.Namespace) -> int:
        from securefl.ml.synth import synthesize

        def progress(done: int, total: int) -> None:
            if done == total or done % 200 == 0:
                print(f"\r{done}/{total} images", end="", file=sys.stderr, flush=True)

        summary = synthesize(
            args.out, hospitals=args.hospitals, seed=args.seed,
            train_per_hospital=args.train, test_per_hospital=args.test,
            size=args.size, image_format=args.format, progress=progress,
        )
        print(file=sys.stderr)
        for name, info in summary["hospitals"].items():
            counts = ", ".join(f"{c} {n}" for c, n in sorted(info["Training"].items()))
            print(f"{args.out / name}: training {counts}")
        return 0

    s.set_defaults(func=run)


def _add_client_ml_actions(actions: argparse._SubParsersAction) -> None:
    """The hospital's local ML actions under ``securefl client --config FILE``."""
    t = actions.add_parser("train", help="train the local model on data_dir/Training")
    t.add_argument("--epochs", type=int, help="override the settings' epochs")
    e = actions.add_parser("evaluate", help="score the model on data_dir/Testing, then save it")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    c = actions.add_parser("classify", help="class probabilities for one scan")
    c.add_argument("image", type=Path, help="a JPEG or PNG scan")
    c.add_argument("--json", action="store_true", help="print the probabilities as JSON")

    def settings(args: argparse.Namespace) -> Any:
        from securefl.ml.settings import load_ml_settings

        loaded = load_ml_settings(args.config)
        if getattr(args, "epochs", None):
            loaded = loaded.model_copy(update={"epochs": args.epochs})
        return loaded

    def run_train(args: argparse.Namespace) -> int:
        from securefl.ml.local import run_train

        def progress(p: Any) -> None:
            print(
                f"\repoch {p.epoch}/{p.epochs}  batch {p.batch}/{p.batches}  "
                f"loss {p.loss:.4f}  accuracy {p.accuracy:.3f}",
                end="", file=sys.stderr, flush=True,
            )

        cfg = settings(args)
        result = run_train(cfg, progress=progress)
        print(file=sys.stderr)
        print(
            f"trained on {result.num_samples} scans in {result.seconds:.1f} s; "
            f"final loss {result.history['loss'][-1]:.4f}, accuracy "
            f"{result.history['accuracy'][-1]:.3f}; model saved to {cfg.model_path}"
        )
        return 0

    def run_evaluate(args: argparse.Namespace) -> int:
        from securefl.ml.local import run_evaluate

        report = run_evaluate(settings(args))
        print(json.dumps(report.to_dict()) if args.json else report.format())
        return 0

    def run_classify(args: argparse.Namespace) -> int:
        from securefl.ml.local import run_classify

        probs = run_classify(settings(args), args.image)
        if args.json:
            print(json.dumps(probs))
        else:
            for name, p in sorted(probs.items(), key=lambda kv: -kv[1]):
                print(f"{name:<12} {p:6.1%}")
        return 0

    t.set_defaults(func=run_train)
    e.set_defaults(func=run_evaluate)
    c.set_defaults(func=run_classify)


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="a hospital: local training, evaluation, classification")
    p.add_argument("--config", type=Path, required=True, help="the hospital's TOML file")
    actions = p.add_subparsers(dest="client_action", metavar="ACTION", required=True)
    _add_client_ml_actions(actions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="securefl",
        description="Federated brain-tumour MRI classification with secure aggregation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_demo, _add_data, _add_client):
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
