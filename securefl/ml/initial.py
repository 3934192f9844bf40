"""The federation's version-0 model as a flat vector, from the model spec alone.

Why a module with a ``__main__``: the server must start from exactly the weights every
hospital would build from the same spec (seeded initialisation), but it should never carry
TensorFlow's half a gigabyte of memory and seconds of import time.  So the server runs
``python -m securefl.ml.initial`` once, in a child process, when its model store is empty,
and reads back the ``.npy`` file it writes.  With ``--layers-out`` it also writes the
``[name, size]`` of every weight tensor in vector order (JSON): the server's optimiser needs
them to find the batch-norm statistics (``securefl.fedopt.statistics_layout``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from securefl.errors import ConfigError
from securefl.ml.settings import ModelSpec


def initial_vector(spec: Mapping[str, Any]) -> np.ndarray:
    """Weights of ``make_model`` for the spec (the ``[model.ml]`` table of server.toml)."""
    return initial_model(spec)[0]


def parse_spec(spec: Mapping[str, Any]) -> ModelSpec:
    """The spec as the server validated it (the child checks again: it may be run alone)."""
    try:
        return ModelSpec.model_validate(dict(spec))
    except ValidationError as exc:
        unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            raise ConfigError(f"unknown [model.ml] setting(s): {', '.join(sorted(unknown))}; "
                              f"allowed: {', '.join(sorted(ModelSpec.model_fields))}") from None
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"[model.ml]: {problems}") from None


def initial_model(spec: Mapping[str, Any]) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """The version-0 vector and the ``(name, size)`` of its weight tensors, in order."""
    parsed = parse_spec(spec)
    from securefl.ml.model import make_model, to_vector, weight_spec

    size = parsed.image_size
    model = make_model((size, size, parsed.channels), len(parsed.classes),
                       kind=parsed.model_kind, seed=parsed.seed or 0)
    layers = [(layer.name, layer.size) for layer in weight_spec(model).layers]
    return to_vector(model), layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m securefl.ml.initial")
    parser.add_argument("--spec", required=True, help="the model spec as JSON")
    parser.add_argument("--out", type=Path, required=True, help=".npy file to write")
    parser.add_argument("--layers-out", type=Path,
                        help="also write the [name, size] of each weight tensor here (JSON)")
    args = parser.parse_args(argv)
    try:
        vector, layers = initial_model(json.loads(args.spec))
        np.save(args.out, vector)
        if args.layers_out is not None:
            args.layers_out.write_text(json.dumps(layers), encoding="utf-8")
    except ConfigError as exc:
        print(f"securefl: {exc.message}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
