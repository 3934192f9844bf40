"""The headless ``securefl client`` and ``securefl admin`` commands over the session APIs.

Why files in ``state_dir``: ``get`` and ``send`` are separate processes, so the downloaded
global model and its version are kept next to the hospital's settings; ``send`` then knows
which version the update was trained on without being told.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np

from securefl import config
from securefl.client.hospital import Hospital
from securefl.client.session import AdminSession, HospitalSession, RoundStep, UnmaskProgress
from securefl.errors import DataError


def _settings(args: argparse.Namespace) -> config.ClientSettings:
    return config.load(args.config, config.ClientSettings)


def _load_vector(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False).astype(np.float32).reshape(-1)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read a weight vector from {path} (.npy expected)") from exc


def _print_step(step: RoundStep) -> None:
    print(f"  - {step.detail}", flush=True)


def _print_unmask(p: UnmaskProgress) -> None:
    print(f"  - unmasking round {p.round_id}: {p.answered} of {p.asked} hospitals answered "
          f"({p.needed} needed)", flush=True)


async def hospital(args: argparse.Namespace) -> int:
    settings = _settings(args)
    data = settings.state_dir
    async with HospitalSession(settings) as session:
        if session.resend_round is not None:
            print(f"note: round {session.resend_round} was abandoned by a server restart; "
                  "send your update again")
        action = args.client_action
        if action == "status":
            st = await session.status()
            print(f"version {st.version}; round {st.round_id or '-'} {st.phase}; online "
                  f"{', '.join(st.online) or '-'}; joined {len(st.joined)}; submitted "
                  f"{len(st.submitted)}")
            return 0
        hospital = Hospital.from_file(args.config) if settings.ml is not None else None
        if action == "get" and hospital is not None:
            model = await hospital.get(session)
            print(f"global version {model.version} downloaded (sha256 {model.sha256[:16]}..., "
                  f"{model.contributors} hospitals, {model.total_samples} scans) and loaded "
                  f"into the local model {hospital.ml.model_path}")
            return 0
        if action == "get":
            model = await session.get_global()
            data.mkdir(parents=True, exist_ok=True)
            np.save(data / "global.npy", model.weights)
            (data / "global.json").write_text(json.dumps(
                {"version": model.version, "sha256": model.sha256}))
            print(f"global version {model.version} ({model.weights.size} parameters, sha256 "
                  f"{model.sha256[:16]}...) saved to {data / 'global.npy'}")
            return 0
        # send
        if args.update is None and args.weights is None:
            if hospital is None:
                raise DataError("give --update or --weights, or add an [ml] table so the "
                                "trained local model is sent")
            print(f"sending the local model's update (trained from version "
                  f"{hospital.local_state().base_version}); staying until the round is "
                  "aggregated...")
            outcome = await hospital.send(session, on_step=_print_step)
            print(f"round {outcome.round_id} published global version {outcome.version}")
            return 0
        if args.samples is None:
            raise DataError("--samples is needed with --update or --weights")
        try:
            meta = json.loads((data / "global.json").read_text())
        except FileNotFoundError:
            raise DataError("no downloaded global model: run `securefl client get` first, "
                            "then train") from None
        base = args.base_version if args.base_version is not None else meta["version"]
        if args.weights is not None:
            update = _load_vector(args.weights) - _load_vector(data / "global.npy")
        else:
            update = _load_vector(args.update)
        print(f"joining the round with an update trained on version {base}; staying until "
              "the round is aggregated...")
        outcome = await session.send(update, args.samples, base_version=base)
        assert outcome is not None
        print(f"round {outcome.round_id} published global version {outcome.version}")
        return 0


async def admin(args: argparse.Namespace) -> int:
    async with AdminSession(_settings(args)) as session:
        action = args.action
        if action == "status":
            st = await session.status()
            print(json.dumps({
                "version": st.version, "round": st.round_id, "phase": st.phase,
                "online": list(st.online), "joined": list(st.joined),
                "submitted": list(st.submitted), "collected": st.collected}))
        elif action == "aggregate":
            out = await session.aggregate(on_progress=_print_unmask)
            print(f"published version {out.version} from {out.contributors} hospitals "
                  f"({out.total_samples} samples), sha256 {out.sha256}")
        elif action == "version":
            print(await session.version())
        elif action == "count":
            print(await session.count())
        elif action == "close":
            print(f"enrolment of round {await session.close_enrolment()} closed")
        elif action == "hospitals":
            for h in await session.hospitals():
                print(json.dumps(h.__dict__))
        elif action == "history":
            for v in await session.history():
                print(json.dumps(v.__dict__))
        elif action == "audit":
            for e in await session.audit():
                print(json.dumps(e.__dict__))
        elif action == "abort":
            print(f"round {await session.abort_round()} aborted; hospitals will send again")
    return 0


def run(coro_fn: object, args: argparse.Namespace) -> int:
    return asyncio.run(coro_fn(args))  # type: ignore[operator]
