"""The federated demo: a whole federation on this machine, in one command.

It makes what a real deployment has — a federation CA and certificates, a server process on
loopback, hospitals with their own (synthetic) scans — and lets it run the way a real
federation does, with nobody at it: the server opens rounds on an automatic schedule
(``[schedule] mode = "auto"``) and each hospital is its agent (``securefl client ...
agent``, ``participation = "auto"``), which gets the global model, trains, takes part in
the secure aggregation, gets the published version and evaluates it.  After each round the
demo prints how each hospital's copy of the shared model does on that hospital's own
validation scans next to a model the hospital trained alone for the same number of epochs,
and how the shared model as published does on all of them.  The Testing scans are
scored once, after the last round, for the summary: choosing anything (such as how many
rounds to run) by watching the Testing figures would make them flattering, so the
per-round view is validation, as it is in the hospital app and in ``evaluate``.

Why every party is its own process: the server and the agents are what a hospital IT team
runs as services, so the demo starts them exactly so; this process only trains the
"alone" comparison models and reads files (``securefl.demo.unattended``).  Each hospital
has its own certificate and its own TLS connection.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from securefl.certs import CertDir
from securefl.client.agent.rules import RoundEntry
from securefl.client.hospital import Hospital
from securefl.config import ServerSettings, load, write_toml
from securefl.demo import unattended
from securefl.demo.settings import DemoSettings
from securefl.errors import ConfigError
from securefl.server.store import ModelStore

if TYPE_CHECKING:  # pragma: no cover
    from securefl.ml.data import ImageSet

Print = Callable[[str], None]
#: Marks a folder as the demo's own, so a later run may replace it.
MARKER = ".securefl-demo"
#: The server's training deadline: every hospital joins long before it on this machine, so
#: each round closes enrolment as soon as all have joined; generous for large --image-size.
TRAINING_DEADLINE = "30m"
#: How long the demo waits for one round's version and the agents' records of it.
ROUND_TIMEOUT = 45 * 60.0


@dataclass
class RoundRow:
    """One set of figures, balanced accuracy (mean per-class recall): after every round on
    the hospitals' validation scans, and once after the last round on their Testing scans."""

    round: int
    version: int
    seconds: float
    #: On each hospital's own scans: its model from the shared one (personalised as its
    #: ``[ml] personalise`` says), and its model trained alone.
    global_acc: dict[str, float]
    local_acc: dict[str, float]
    #: On every hospital's scans pooled: the mean over hospitals of each one's model from
    #: the shared one, and each model trained alone.
    pooled_global: float = 0.0
    pooled_local: dict[str, float] = field(default_factory=dict)


@dataclass
class DemoResult:
    folder: Path
    #: Per round, on validation scans (what the table shows while the demo runs).
    rows: list[RoundRow] = field(default_factory=list)
    #: After the last round, on Testing scans (the reported figures of the summary).
    testing: RoundRow | None = None
    wall_s: float = 0.0

    def _final(self) -> RoundRow:
        if self.testing is None:
            raise ValueError("the demo has not finished its last round yet")
        return self.testing

    @property
    def final_global_acc(self) -> float:
        """The hospitals' copies of the shared model on all hospitals' test scans (their
        mean), after the last round."""
        return self._final().pooled_global

    @property
    def best_local_acc(self) -> float:
        """The best model trained alone, on the same pooled test scans."""
        return max(self._final().pooled_local.values())

    @property
    def mean_local_acc(self) -> float:
        last = self._final().pooled_local
        return sum(last.values()) / len(last)

    @property
    def own_local_acc(self) -> dict[str, float]:
        """Each hospital's model trained alone, on its own test scans, after the last round."""
        return dict(self._final().local_acc)

    @property
    def own_shared_acc(self) -> dict[str, float]:
        """Each hospital's copy of the shared model, on its own test scans, last round."""
        return dict(self._final().global_acc)


#: Every line the demo prints fits a terminal this wide (a new user's 80 columns).
WIDTH = 80
#: A round-table cell, "alone -> copy" in percent: at most "100.0 -> 100.0".
_CELL = 14
#: Hospitals on one line of the round table: with more, each round takes further lines
#: (the round, the pooled column and the time stay on the first), so it stays in WIDTH.
PER_LINE = 3


def wrapped(text: str, indent: str = "  ", first: str | None = None) -> list[str]:
    """``text`` as lines of at most :data:`WIDTH` columns (a path or a word longer than a
    line is kept whole, on a line of its own)."""
    return textwrap.wrap(text, WIDTH, initial_indent=indent if first is None else first,
                         subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def _say_wrapped(say: Print, text: str, indent: str = "  ", first: str | None = None) -> None:
    for line in wrapped(text, indent, first):
        say(line)


def _lines_of(names: list[str]) -> list[list[str]]:
    return [names[i:i + PER_LINE] for i in range(0, len(names), PER_LINE)] or [[]]


def table_legend(personalise: str) -> list[str]:
    """What the round table's columns mean, wrapped: printed before it.  ``personalise`` is
    the hospitals' ``[ml] personalise``, which makes each hospital's copy."""
    how = {"best": "as downloaded, recalibrated or fine-tuned, whichever read its validation "
                   "scans best, so a little flattered; the Testing summary is not",
           "recalibrate": "recalibrated on its scans",
           "finetune": "fine-tuned on its scans",
           "downloaded": "as downloaded"}.get(personalise, "as downloaded")
    return wrapped(
        "Balanced accuracy (%) on validation scans; round n publishes version n.  Under "
        "each hospital, alone -> copy: a model it trained alone for the same epochs, then "
        f"this hospital's copy of the shared model ({how}), on its own scans.  "
        "\"best alone -> published\": the best model trained alone, then the shared model "
        "as published, on all hospitals' scans.  time: since the previous version.")


def table_header(names: list[str]) -> list[str]:
    """The round table's header lines (two, and one more for each further line of hospitals,
    see :data:`PER_LINE`).  A function so that docs/generate_samples.py's test can check
    README's sample still has the layout the demo prints."""
    first, *more = _lines_of(names)
    return ([" " * 7 + "".join(f"  {'alone -> copy':>{_CELL}}" for _ in first)
             + "  best alone -> published",
             f"  {'round':>5}" + "".join(f"  {n[:_CELL]:>{_CELL}}" for n in first)
             + f"  {'all hospitals':>{_CELL}}  {'time':>5}"]
            + [" " * 7 + "".join(f"  {n[:_CELL]:>{_CELL}}" for n in line) for line in more])


def _cell(alone: float, shared: float) -> str:
    return f"{f'{alone * 100:.1f} -> {shared * 100:.1f}':>{_CELL}}"


def table_row(row: RoundRow, names: list[str]) -> list[str]:
    """One round's lines of the table (see :func:`table_header`): one, and one more for
    each further line of hospitals."""
    first, *more = _lines_of(names)
    best = max(row.pooled_local.values())
    return ([f"  {row.round:>5}"
             + "".join(f"  {_cell(row.local_acc[n], row.global_acc[n])}" for n in first)
             + f"  {_cell(best, row.pooled_global)}  {row.seconds:>4.0f}s"]
            + [" " * 7 + "".join(f"  {_cell(row.local_acc[n], row.global_acc[n])}"
                                 for n in line) for line in more])


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def summary_lines(final: RoundRow, rounds: int) -> list[str]:
    """The summary of the Testing figures, wrapped.  Its first sentence is whether every
    hospital is better off on its own test scans with its copy of the shared model than
    training alone, naming any that is not: that is the figure a hospital joins for, so
    no pooled figure comes before it."""
    names = list(final.local_acc)
    behind = [n for n in names if not final.global_acc[n] > final.local_acc[n]]
    if behind:
        if len(behind) == 1:
            lead = (f"{behind[0]} is NOT better off: on its own test scans its copy of the "
                    "shared model does no better than the model it trained alone.")
        else:
            lead = (f"{_listed(behind)} are NOT better off: on their own test scans their "
                    "copies of the shared model do no better than the models they trained "
                    "alone.")
    else:
        lead = ("every hospital is better off: on its own test scans, its copy of the "
                "shared model beats the model it trained alone.")
    lines = wrapped(f"after {rounds} rounds, {lead}", first="summary: ")
    lines.append("  balanced accuracy on each hospital's own test scans, alone -> its copy:")
    width = max(len(n) for n in names)
    for n in names:
        alone, copy = final.local_acc[n], final.global_acc[n]
        points = abs(copy - alone) * 100
        verdict = (f"better by {points:.1f} points" if copy > alone
                   else f"WORSE by {points:.1f} points" if copy < alone
                   else "no better" if copy == alone else "NOT scored")
        lines.append(f"    {n:<{width}}  {alone:>5.1%} -> {copy:>5.1%}  {verdict}")
    best = max(final.pooled_local.values())
    mean = sum(final.pooled_local.values()) / len(final.pooled_local)
    ahead = (final.pooled_global - best) * 100
    lines += wrapped(
        f"On all {len(names)} hospitals' test scans together, the hospitals' copies of the "
        f"shared model score {final.pooled_global:.1%} on average; the best model trained "
        f"alone {best:.1%} (the mean of those trained alone {mean:.1%}): the copies are "
        + (f"ahead by {ahead:.1f} points." if ahead > 0 else
           f"BEHIND by {abs(ahead):.1f} points: more rounds (--rounds) usually help."))
    return lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def validation_minimum(settings: DemoSettings) -> int:
    """The demo hospitals' ``min_validation_per_class``: half the rarest class's training
    scans, at most 5 (the product's default); too few scans for one validation and one
    training scan of every class is refused before anything is built."""
    from securefl.ml.synth import class_counts, make_sites

    sites = make_sites(settings.hospitals, settings.seed)

    def rarest_of(total: int) -> int:
        return min(min(class_counts(total, site.class_weights)) for site in sites)

    rarest = rarest_of(settings.train_images)
    if rarest < 2:
        enough = next(n for n in range(settings.train_images, 10_000) if rarest_of(n) >= 2)
        raise ConfigError(f"--train-images {settings.train_images} gives the rarest tumour type "
                          f"{rarest} training scan(s) at some hospital, but each class needs "
                          f"one for validation and one to train on: use --train-images "
                          f"{enough} or more")
    if settings.min_validation_per_class is not None:
        return settings.min_validation_per_class
    return min(5, rarest // 2)


def _ml_table(settings: DemoSettings, data_dir: Path, model_dir: Path) -> dict[str, object]:
    return {"scans_dir": data_dir, "model_dir": model_dir, "image_size": settings.image_size,
            "model_kind": settings.model_kind, "epochs": settings.epochs,
            "seed": settings.seed, "min_validation_per_class": validation_minimum(settings)}


def build_federation(settings: DemoSettings, root: Path, say: Print, *,
                     schedule: dict[str, object] | None = None,
                     agent: dict[str, object] | None = None) -> tuple[Path, list[Path], Path]:
    """Certificates, synthetic scans and settings files; returns server, hospital and admin
    settings paths.  ``schedule`` and ``agent``, when given, are server.toml's
    ``[schedule]`` and every hospital.toml's ``[agent]`` (``securefl.demo.unattended``)."""
    from securefl.ml.synth import synthesize

    names = [f"hospital_{i + 1}" for i in range(settings.hospitals)]
    validation_minimum(settings)  # enough scans per class, or nothing is built
    port = _free_port()
    say(f"  certificates for the server, the administrator and {len(names)} hospitals")
    certs = CertDir(root / "certs")
    certs.init(["localhost", "127.0.0.1"], names, port=port)
    total = settings.hospitals * (settings.train_images + settings.test_images)
    say(f"  synthetic MRI slices: {total} images at {settings.image_size} px")
    synthesize(root / "data", hospitals=settings.hospitals, seed=settings.seed,
               train_per_hospital=settings.train_images, test_per_hospital=settings.test_images,
               size=settings.image_size)
    # One colluding hospital is assumed (the default) when there are at least three; two
    # hospitals can each work out the other's update from the published model anyway, so
    # with two the only adversary secure aggregation can hold off is the server (c = 0).
    colluders = 1 if settings.hospitals >= 3 else 0
    if not colluders:
        _say_wrapped(say, "two hospitals: secure aggregation hides each update from the "
                     "server, but each hospital can work out the other's from the published "
                     "model", first="  ")
    server_toml = write_toml(root / "server.toml", {
        "cert": certs.root / "server.pem", "key": certs.root / "server.key",
        "ca": certs.root / "ca.pem", "crl": certs.root / "crl.pem",
        "members": certs.members,
        "host": "127.0.0.1", "port": port,
        "store_dir": root / "server" / "store", "audit_log": root / "server" / "audit.jsonl",
        "hospitals": names,
        "round": {"min_clients": min(2, settings.hospitals), "colluders": colluders},
        "model": {"ml": {"image_size": settings.image_size, "model_kind": settings.model_kind,
                         "seed": settings.seed}},
        **({"schedule": schedule} if schedule is not None else {}),
    })
    hospital_tomls = []
    for name in names:
        hospital_tomls.append(write_toml(certs.kit(name) / "hospital.toml", {
            "host": "127.0.0.1", "port": port,
            "cert": "hospital.pem", "key": "hospital.key", "ca": "ca.pem",
            "state_dir": root / "hospitals" / name / "state",
            "ml": _ml_table(settings, root / "data" / name, root / "hospitals" / name / "model"),
            "policy": {"colluders": colluders},
            **({"agent": agent} if agent is not None else {}),
        }, f"the demo's settings for '{name}'; paths are relative to this file."))
    return server_toml, hospital_tomls, certs.root / "admin.toml"


def _pooled(model_of: Hospital, scans: ImageSet) -> float:
    from securefl.ml.train import evaluate

    return evaluate(model_of.model(), scans).balanced_accuracy


def _figures(hospitals: list[Hospital], alone: dict[str, Hospital], split: str,
             pooled: ImageSet, r: int, version: int, seconds: float) -> RoundRow:
    """Every hospital's shared-model copy and its model trained alone, on its own scans of
    ``split`` and on everyone's (``pooled``)."""
    names = [h.ml.scans_dir.name for h in hospitals]
    global_acc, local_acc = {}, {}
    for name, h in zip(names, hospitals, strict=True):
        global_acc[name] = h.evaluate(split).balanced_accuracy
        local_acc[name] = alone[name].evaluate(split).balanced_accuracy
    pooled_local = {n: _pooled(alone[n], pooled) for n in names}
    pooled_global = sum(_pooled(h, pooled) for h in hospitals) / len(hospitals)
    return RoundRow(r, version, seconds, global_acc, local_acc, pooled_global, pooled_local)


def _round_recorded(hospitals: list[Hospital], store: ModelStore, version: int
                    ) -> dict[str, RoundEntry] | None:
    """Every agent's record of the round that published ``version``, once all are written."""
    if version not in store.versions():
        return None
    found = {h.ml.scans_dir.name: unattended.agent_entry(h.state_dir, version)
             for h in hospitals}
    return found if all(found.values()) else None  # type: ignore[return-value]


def _watch_rounds(settings: DemoSettings, hospitals: list[Hospital],
                  alone: dict[str, Hospital], procs: unattended.Processes, store: ModelStore,
                  say: Print, result: DemoResult) -> None:
    """Train the comparison models here while the agents take part in the server's rounds,
    and print each published version's figures.  Only files are read: the store, and each
    agent's record (the validation balanced accuracy it measured on the version it got)."""
    from securefl.ml.data import ImageSet

    names = [h.ml.scans_dir.name for h in hospitals]
    validation = ImageSet.concat([h.validation() for h in hospitals])
    say("")
    for line in table_header(names):
        say(line)
    for r in range(1, settings.rounds + 1):
        for name in names:
            alone[name].train()
        entries = unattended.wait_for(
            f"version {r} and every agent's record of it",
            partial(_round_recorded, hospitals, store, r), procs, ROUND_TIMEOUT)
        nan = float("nan")  # an agent that could not evaluate says why in its log
        global_acc = {n: nan if (acc := entries[n].balanced_accuracy) is None else float(acc)
                      for n in names}
        local_acc = {n: alone[n].evaluate("validation").balanced_accuracy for n in names}
        pooled_local = {n: _pooled(alone[n], validation) for n in names}
        pooled_global = unattended.score_version(store.read(r)[1], hospitals[0].ml, validation)
        # The round's time as the server saw it (previous publication to this one), not
        # when this watcher got to it: the agents do not wait for the comparison models.
        row = RoundRow(r, r, _between(store, r - 1, r), global_acc, local_acc, pooled_global,
                       pooled_local)
        result.rows.append(row)
        for line in table_row(row, names):
            say(line)


def _between(store: ModelStore, earlier: int, later: int) -> float:
    """Seconds between two versions' publications (their stored UTC times)."""
    from datetime import datetime

    times = [datetime.fromisoformat(store.info(v).created) for v in (earlier, later)]
    return (times[1] - times[0]).total_seconds()


def _final_models(hospitals: list[Hospital], store: ModelStore, version: int) -> None:
    """Each hospital's model is its copy of ``version`` (what its agent made of it), also if
    an agent began on a later round before it stopped (a run across midnight: the daily
    limit starts again)."""
    weights = None
    for h in hospitals:
        state = h.local_state()
        if state.base_version != version or state.trained:
            weights = store.read(version)[1] if weights is None else weights
            h.apply_global(weights, version)


def closing_lines(wall_s: float, root: Path) -> list[str]:
    """Where the demo left its federation, after the summary."""
    return [*wrapped(f"took {wall_s:.0f} s.  Everything is in {root}:"),
            "    certs/ (CA, server, admin, hospital kits)  data/ (synthetic scans)",
            "    server/ (model versions, audit log)  server.log",
            "    hospitals/<name>/ (local models, metrics history, the agent's agent.log)"]


def run(settings: DemoSettings, say: Print = print,
        on_ready: Callable[[Path], None] | None = None,
        before_stop: Callable[[], None] | None = None) -> DemoResult:
    """Build the federation, let it run its rounds unattended, stop it; the folder is left
    behind.

    The server runs with an automatic schedule (a round opens as soon as the previous one
    published) and every hospital as its agent (``securefl client ... agent``,
    ``participation = "auto"``, at most ``rounds`` rounds a day), each its own process; this
    process only trains the comparison models and reads files.

    ``on_ready`` is called with the admin settings file once the server is up, and
    ``before_stop`` after the last round, before the server stops (``--tui`` opens the
    administrator's app on the first and keeps the server up until the app is closed).
    The server's ``[schedule] until_version`` is the last round's version, so no round
    opens after it.
    """
    started = time.perf_counter()
    root = (settings.keep or Path(tempfile.mkdtemp(prefix="securefl-demo-"))).resolve()
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise ConfigError(f"{root} is not empty and was not made by the demo: give --keep "
                              "a new or empty folder (the demo never deletes other files)")
        shutil.rmtree(root)  # an earlier demo's federation: start afresh
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by `securefl demo`; the demo may delete this folder\n")
    result = DemoResult(root)
    _say_wrapped(say, f"a federation of {settings.hospitals} hospitals in {root}",
                 first="securefl demo: ")
    _say_wrapped(say, "(built-in SYNTHETIC brain MRI slices: for trying securefl, not for "
                 "clinical use)")
    server_toml, hospital_tomls, admin_toml = build_federation(
        settings, root, say,
        # the server pauses its schedule once the last round published: no round opens
        # after it that the agents would only decline
        schedule=unattended.schedule_table(TRAINING_DEADLINE, until_version=settings.rounds),
        agent=unattended.agent_table(settings.rounds))
    _say_wrapped(say, "starting the server (TLS 1.3, mutual certificates, rounds on an "
                 "automatic schedule) and building model version 0")
    procs = unattended.Processes()
    try:
        procs.server(server_toml, root / "server.log")
        if on_ready is not None:
            on_ready(admin_toml)
        hospitals = [Hospital.from_file(p) for p in hospital_tomls]
        for h, kit in zip(hospitals, hospital_tomls, strict=True):
            procs.agent(h.ml.scans_dir.name, kit,
                        root / "hospitals" / h.ml.scans_dir.name / "agent.log")
        # The same hospitals training alone: same data, same seeded start, never connected.
        alone = {h.ml.scans_dir.name: Hospital(
            h.settings.model_copy(update={"state_dir": root / "hospitals" / h.ml.scans_dir.name
                                          / "alone-state"}),
            h.ml.model_copy(update={"model_dir": root / "hospitals" / h.ml.scans_dir.name
                                    / "alone"})) for h in hospitals}
        _say_wrapped(say, f"{settings.rounds} rounds with no one at the keyboard: each "
                     "hospital's agent takes part in every round the server opens "
                     "(participation = \"auto\"), trains "
                     f"{settings.epochs} epoch(s) on its own scans, and the server combines "
                     "the updates by secure aggregation and publishes by itself.")
        say("")
        for line in table_legend(hospitals[0].ml.personalise):
            say(line)
        store = unattended.watch_store(load(server_toml, ServerSettings).store_dir)
        _watch_rounds(settings, hospitals, alone, procs, store, say, result)
        for name in alone:
            procs.stop(name, timeout=60)
        _say_wrapped(say, "scoring the last round's models on the Testing scans (used for "
                     "nothing else)")
        from securefl.ml.data import ImageSet

        _final_models(hospitals, store, settings.rounds)
        tests = ImageSet.concat([h.scans("Testing") for h in hospitals])
        result.testing = _figures(hospitals, alone, "testing", tests, settings.rounds,
                                  settings.rounds, 0.0)
        if before_stop is not None:
            before_stop()
    finally:
        procs.stop_all(timeout=10)
    result.wall_s = time.perf_counter() - started
    say("")
    for line in summary_lines(result._final(), settings.rounds):
        say(line)
    for line in closing_lines(result.wall_s, root):
        say(line)
    return result


def run_with_admin_app(settings: DemoSettings) -> DemoResult:
    """The demo in a background thread, the administrator's app in the foreground.

    The app owns the terminal, so the demo writes its table to ``demo.log`` in the
    federation folder; the table is printed when the app is closed (the demo finishes
    first if it is still running).
    """
    import threading

    from securefl.tui.admin.app import run_admin_app

    root = (settings.keep or Path(tempfile.mkdtemp(prefix="securefl-demo-"))).resolve()
    settings = DemoSettings(**{**settings.__dict__, "keep": root})
    log = root.parent / f"{root.name}-demo.log"
    ready, app_closed = threading.Event(), threading.Event()
    box: dict[str, object] = {}

    def say(line: str) -> None:
        with log.open("a") as fh:
            fh.write(line + "\n")

    def work() -> None:
        def opened(admin_toml: Path) -> None:
            box["admin"] = admin_toml
            ready.set()

        def rounds_done() -> None:
            say("  the server stays up until the administrator's app is closed.")
            app_closed.wait()

        try:
            box["result"] = run(settings, say=say, on_ready=opened, before_stop=rounds_done)
        except BaseException as exc:  # reported after the app closes
            box["error"] = exc
        finally:
            ready.set()

    for line in wrapped(f"building the federation in {root} (progress in {log}) ...",
                        first="securefl demo: "):
        print(line)
    thread = threading.Thread(target=work, name="securefl-demo", daemon=True)
    thread.start()
    ready.wait()
    if "admin" in box:
        try:
            run_admin_app(box["admin"])  # type: ignore[arg-type]
        finally:
            app_closed.set()
        if thread.is_alive():
            print("securefl demo: the app is closed; waiting for the demo's last round "
                  "...")
    app_closed.set()
    thread.join()
    print(log.read_text(), end="")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
