"""Settings for the server, a hospital and the admin: the one module that reads and writes
TOML.

Why pydantic models and not a dict: a typo in a settings file must stop the program before
it listens or connects (``extra="forbid"``), with a message naming the file and the field —
including the hospital's ``[ml]`` table and the server's ``[model.ml]``, which are typed
here (:class:`~securefl.ml.settings.MLSettings`, :class:`~securefl.ml.settings.ModelSpec`)
rather than handed on as dicts to be checked later in another process.  Relative paths are
resolved against the settings file's own folder, so a hospital kit can be copied anywhere
and still work.

Why one writer (:func:`toml_text` / :func:`write_toml`, on ``tomli-w``): settings files made
by string formatting broke on paths with quotes or backslashes and drifted from the models;
every generated file (kits, the demo's and the tests' federations) goes through it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from securefl.errors import ConfigError
from securefl.fedopt import ServerOptSettings
from securefl.ml.settings import MLSettings, ModelSpec, refuse_renamed_keys


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Settings):
    """Deadlines and sizes the server enforces on every connection (seconds, bytes)."""

    handshake_timeout: float = Field(10.0, gt=0)
    #: Longest silence while a frame is partly received (a slow drip is cut here).
    read_timeout: float = Field(30.0, gt=0)
    #: Longest a whole frame may take once its first byte arrived.
    frame_timeout: float = Field(120.0, gt=0)
    #: Longest a connection may stay silent between frames.
    idle_timeout: float = Field(600.0, gt=0)
    #: Authenticated connections, all certificates together; more are closed after the
    #: handshake.  Connections still in their handshake have their own pool (below), so
    #: they can never take one of these.
    max_connections: int = Field(256, ge=1)
    #: Authenticated connections one certificate (name and role) may hold at once.
    max_connections_per_identity: int = Field(16, ge=1)
    #: The last of ``max_connections`` go only to a certificate holding no other connection,
    #: so a registered hospital or the administrator gets in however many others hold.
    reserved_connections: int = Field(32, ge=0)
    #: Connections still in their TLS handshake, all sources together; more are closed at
    #: once.
    max_handshakes: int = Field(64, ge=1)
    #: Connections still in their TLS handshake from one address (one /64 for IPv6); once
    #: authenticated a connection counts against its certificate instead, so hospitals
    #: behind one NAT address are not limited by it.
    max_handshakes_per_source: int = Field(8, ge=1)
    #: Every so often live connections are checked again: one whose certificate expired or
    #: is revoked by the current CRL is closed.
    recheck_interval: float = Field(60.0, gt=0)
    #: Refused connections that never authenticated are written to the audit log as one
    #: summary per this many seconds (counts by reason, the busiest addresses).
    refusal_summary_interval: float = Field(60.0, gt=0)
    max_header_bytes: int = Field(1 << 20, ge=1024)
    #: Extra room over the model's own size for a frame's payload.
    max_payload_bytes: int = Field(1 << 30, ge=1024)

    @model_validator(mode="after")
    def _admission_consistent(self) -> Limits:
        if self.reserved_connections >= self.max_connections:
            raise ValueError(
                f"reserved_connections ({self.reserved_connections}) must be below "
                f"max_connections ({self.max_connections}): lower it or raise max_connections")
        if self.max_connections_per_identity > self.max_connections:
            raise ValueError(
                f"max_connections_per_identity ({self.max_connections_per_identity}) exceeds "
                f"max_connections ({self.max_connections}): lower it")
        if self.max_handshakes_per_source > self.max_handshakes:
            raise ValueError(
                f"max_handshakes_per_source ({self.max_handshakes_per_source}) exceeds "
                f"max_handshakes ({self.max_handshakes}): lower it")
        return self


def _check_fractions(corrupt: float, dropout: float, where: str) -> None:
    """The analysis (Bell et al. 2020 against a server that deviates) is only feasible for
    corrupt + 2 * dropout <= 0.9; refused at load, not at the first sparse round."""
    if corrupt + 2 * dropout > 0.9 + 1e-12:
        raise ValueError(
            f"{where}.corrupt_fraction + 2 x {where}.dropout_fraction is "
            f"{corrupt + 2 * dropout:g}; "
            "it must be at most 0.9 for any SecAgg+ graph to be safe: lower one of them")


class RoundSettings(_Settings):
    """How a secure-aggregation round is formed."""

    min_clients: int = Field(2, ge=2)
    #: After this many seconds with at least ``min_clients`` joined, enrolment closes.
    enrolment_timeout: float = Field(30.0, gt=0)
    #: Longest wait for the hospitals' key shares and unmask answers before going on
    #: without the silent ones (they count as dropped).
    step_timeout: float = Field(60.0, gt=0)
    #: SecAgg+ (Bell et al. 2020): each hospital masks with k neighbours of a random graph
    #: instead of all others, with k and t sized from ``corrupt_fraction`` and
    #: ``dropout_fraction`` (the full graph when that saves less than half the work).
    #: Hospitals accept it only with ``[policy] allow_sparse`` and their own fractions.
    sparse: bool = False
    #: SecAgg+ only: fraction of hospitals assumed dishonest (gamma) and able to drop out
    #: during a round (delta); corrupt_fraction + 2 * dropout_fraction must be <= 0.9.
    corrupt_fraction: float = Field(0.05, ge=0, lt=1)
    dropout_fraction: float = Field(0.1, ge=0, lt=1)
    #: Hospitals assumed able to collude with a dishonest server (c).  The threshold is
    #: floor((n + c) / 2) + 1 and a round needs c + 2 hospitals; hospitals refuse a round
    #: sized for a smaller c than their own ``[policy] colluders``, so keep the two equal.
    colluders: int = Field(1, ge=0, le=100)
    #: "secagg" masks every input; "plain" runs the same transport without masks (benchmark
    #: baseline only: the server then sees each hospital's update).
    masking: str = Field("secagg", pattern="^(secagg|plain)$")
    clip: float = Field(1.0, gt=0)
    max_weight: int = Field(10_000, ge=1)
    max_clients: int = Field(100, ge=2)
    #: A round that cannot be unmasked is retried at once with the hospitals still online,
    #: at most this many times in a row (0: report and stop).
    max_retries: int = Field(2, ge=0, le=10)
    #: Seconds between attempts to publish a round's result that the store could not take
    #: (read-only, not permitted, disk full); every admin action also tries at once.
    publish_retry: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _fractions_feasible(self) -> RoundSettings:
        _check_fractions(self.corrupt_fraction, self.dropout_fraction, "round")
        return self


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d)")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, field: str = "duration") -> float:
    """``"30s"``, ``"15m"``, ``"24h"``, ``"2d"`` (or ``"1.5h"``) as seconds; ValueError with
    one sentence otherwise."""
    m = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    seconds = float(m.group(1)) * _UNIT[m.group(2)] if m else 0.0
    if not m or seconds <= 0:
        raise ValueError(f"{field} = {text!r} is not a duration: write a positive number "
                         'and a unit, like "30s", "15m", "24h" or "2d"')
    return seconds


AFTER_PUBLISH = "after-publish"


class ScheduleSettings(_Settings):
    """``[schedule]``: rounds the server opens by itself (issue 17).

    ``mode = "manual"`` (the default) changes nothing: a round opens when a hospital
    joins and publishes when the administrator aggregates.  ``"auto"``: the server opens a
    round ``every`` so often (or right after each round ends: ``"after-publish"``), tells the
    connected hospitals (``round_open``), waits ``training_deadline`` for them to train and
    join, runs the masked round and publishes without an administrator.
    """

    mode: Literal["manual", "auto"] = "manual"
    every: str = "24h"
    training_deadline: str = "2h"
    #: ``"paused"``: the server starts with its schedule paused (``admin resume`` starts it).
    start: Literal["running", "paused"] = "running"
    #: Once a scheduled round publishes this version (or a later one) the schedule pauses
    #: itself, so a federation meant to run N rounds unattended stops opening rounds nobody
    #: will join; ``admin resume`` lets it go on.  None: no end.
    until_version: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _durations(self) -> ScheduleSettings:
        if self.every != AFTER_PUBLISH:
            try:
                parse_duration(self.every, "every")
            except ValueError as exc:
                raise ValueError(str(exc).replace('or "2d"', 'or "2d", or "after-publish"')
                                 ) from None
        parse_duration(self.training_deadline, "training_deadline")
        return self

    @property
    def interval(self) -> float | None:
        """Seconds between round openings; None for ``"after-publish"``."""
        return None if self.every == AFTER_PUBLISH else parse_duration(self.every)

    @property
    def deadline(self) -> float:
        return parse_duration(self.training_deadline)


class ModelSettings(_Settings):
    """The initial global model: a seeded vector (``params``) or the ML spec (``ml``)."""

    params: int | None = Field(None, ge=1)
    seed: int = 0
    init_scale: float = Field(0.05, ge=0)
    #: The hospitals' CNN (``[model.ml]``), checked when server.toml is loaded.
    ml: ModelSpec | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        """The federation's class names in label order (none for a plain vector model)."""
        return self.ml.classes if self.ml is not None else ()

    def ml_spec(self) -> dict[str, Any]:
        """What ``python -m securefl.ml.initial`` builds version 0 from (JSON-able)."""
        if self.ml is None:
            raise ConfigError("the server settings have no [model.ml] table")
        spec = self.ml.model_dump(mode="json")
        spec["seed"] = self.seed if self.ml.seed is None else self.ml.seed
        return spec


class TLSFiles(_Settings):
    cert: Path
    key: Path
    ca: Path


class ServerSettings(TLSFiles):
    host: str = "127.0.0.1"
    port: int = Field(9095, ge=0, le=65535)
    crl: Path
    #: The operator's signed member list (``securefl certs``), handed to every hospital on
    #: connect; None hands out none (hospitals then rely on their kits' copies).
    members: Path | None = None
    store_dir: Path = Path("store")
    audit_log: Path = Path("audit.jsonl")
    #: Registered hospitals: enrolment closes at once when all of them have joined.
    hospitals: list[str] = Field(default_factory=list)
    limits: Limits = Limits()
    round: RoundSettings = RoundSettings()
    model: ModelSettings = ModelSettings()
    #: How a round's mean update is applied (securefl.fedopt; FedAvgM by default).
    server_opt: ServerOptSettings = ServerOptSettings()
    #: Rounds by hand (the default) or on the server's own schedule.
    schedule: ScheduleSettings = ScheduleSettings()


def _both_rings() -> list[Literal[32, 64]]:
    """``[policy] ring_bits``' default (a function, not a lambda: mypy cannot type a lambda
    against pydantic's two kinds of ``default_factory``)."""
    return [32, 64]


class HospitalPolicy(_Settings):
    """What a hospital accepts from a round whatever the server says (``[policy]``).

    Why the hospital's own: the server runs the round, so anything it decides alone — send
    in the clear, combine too few hospitals — is exactly what a dishonest server would
    decide.  A round that breaks the policy is refused before anything is revealed.
    """

    #: Send the update without masks when the server asks (``masking = "plain"``).  Only
    #: for benchmarks and tests: the server then reads this hospital's update.
    allow_unmasked: bool = False
    #: Never help unmask a sum of fewer hospitals than this (the round may ask for more).
    min_contributors: int = Field(2, ge=2, le=1000)
    #: Other hospitals assumed able to collude with a dishonest server (c).  Default 1: no
    #: hospital is assumed flawless, and each extra one raises the threshold.  A round must
    #: then have a threshold of at least floor((n + c) / 2) + 1 and c + 2 hospitals — with
    #: 3 hospitals and c = 1 all 3 must stay to the end of a round.
    colluders: int = Field(1, ge=0, le=100)
    #: Accept a SecAgg+ sparse graph (``[round] sparse`` on the server); its guarantees
    #: against a deviating server are weaker than the full graph's (docs/SECURITY.md).
    allow_sparse: bool = False
    #: SecAgg+ only: the fractions this hospital assumes dishonest (gamma) and dropping out
    #: (delta).  It refuses a sparse round with fewer neighbours or a lower threshold than
    #: its own analysis of them gives, and signs no survivor list with more dropouts than
    #: delta * n (rounded up).
    corrupt_fraction: float = Field(0.05, ge=0, lt=1)
    dropout_fraction: float = Field(0.1, ge=0, lt=1)
    #: Rings the masked update may be encoded in, and the largest clip accepted.
    ring_bits: list[Literal[32, 64]] = Field(default_factory=_both_rings, min_length=1)
    max_clip: float = Field(10.0, gt=0)
    #: The coarsest fixed-point scale accepted (and the one the "update below the server's
    #: precision" check uses, so that check never depends on the server's choice).
    min_scale: float = Field(64.0, gt=0)
    #: Rounds one update may go into (its masked input leaving) per base version, counting
    #: retries the server announces: each one more sum that contains it.  SecAgg+ graph
    #: draws (revealed seed values) are capped apart at this plus the hospitals assumed
    #: dishonest: each abort gives a dishonest server a fresh random graph to hope for.
    max_attempts: int = Field(3, ge=1, le=10)

    @model_validator(mode="after")
    def _fractions_feasible(self) -> HospitalPolicy:
        _check_fractions(self.corrupt_fraction, self.dropout_fraction, "policy")
        return self


_CLOCK = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])")


def parse_window(text: str) -> tuple[int, int]:
    """``"22:00-06:00"`` as minutes after midnight ``(start, end)``; the end may be before
    the start (a window across midnight).  One sentence for anything else."""
    parts = text.split("-")
    matches = [_CLOCK.fullmatch(p.strip()) for p in parts] if len(parts) == 2 else []
    if len(matches) != 2 or not all(matches):
        raise ValueError(f"window {text!r} is not a local time range like \"22:00-06:00\" "
                         "(24-hour HH:MM-HH:MM): fix it or leave window out to allow any time")
    start, end = (int(m.group(1)) * 60 + int(m.group(2)) for m in matches if m is not None)
    if start == end:
        raise ValueError(f"window {text!r} starts and ends at the same time: give a range, "
                         "or leave window out to allow any time")
    return start, end


class AgentSettings(_Settings):
    """What the hospital's agent (``securefl client ... agent``) may do on its own
    (``[agent]`` in hospital.toml).

    Why the hospital's: the server opens rounds on its schedule, but whether this hospital's
    scans train a model tonight is the hospital's decision.  By default a person approves
    each round (``participation = "approve"``); ``"auto"`` joins every round the limits
    allow.
    """

    #: "approve": wait for a person's Approve or Skip (the app, or ``approve``/``skip``);
    #: "auto": take part without asking.
    participation: Literal["approve", "auto"] = "approve"
    #: Local-time range in which the agent may train and send, e.g. "22:00-06:00" (across
    #: midnight allowed); unset: any time.
    window: str | None = None
    #: Rounds the agent takes part in per local calendar day (a round counts once it starts
    #: training for it).
    max_rounds_per_day: int = Field(24, ge=1, le=1000)
    #: Rounds the agent tries on one global (base) version (a round fails, the server opens
    #: another on the same version); [policy] max_attempts still caps the sums one update
    #: goes into.
    max_attempts_per_version: int = Field(3, ge=1, le=100)
    #: Seconds between the agent's keepalives: keep it below a third of the server's
    #: ``[limits] idle_timeout`` (600 s by default), or the server closes the connection.
    keepalive: float = Field(60.0, gt=0, le=3600)

    @field_validator("window")
    @classmethod
    def _window_valid(cls, value: str | None) -> str | None:
        if value is not None:
            parse_window(value)
        return value

    def window_minutes(self) -> tuple[int, int] | None:
        return parse_window(self.window) if self.window is not None else None


class ClientSettings(TLSFiles):
    host: str = "127.0.0.1"
    port: int = Field(9095, ge=0, le=65535)
    connect_timeout: float = Field(10.0, gt=0)
    #: How long a reply (or the next step of a round) may take before we give up.
    reply_timeout: float = Field(600.0, gt=0)
    #: How long a hospital waits for the next step of a round (the admin decides when the
    #: round is aggregated, so this is long).
    round_timeout: float = Field(3600.0, gt=0)
    #: Hospital only: where the downloaded global model and local updates are kept.
    state_dir: Path = Path("state")
    #: Hospital only: the CA's revocation list as the kit brought it; the server hands out
    #: newer ones (kept in ``state_dir/crl.der``).  Round keys of revoked hospitals are
    #: refused.
    crl: Path | None = None
    #: Hospital only: the operator's signed member list as the kit brought it (default: the
    #: kit's ``members.json``); the server hands out newer ones (kept in
    #: ``state_dir/members.json``).  A round naming anyone else is refused.
    members: Path | None = Path("members.json")
    #: Hospital only: its scans, local model and training settings.
    ml: MLSettings | None = None
    #: Hospital only: what it accepts from a round, whatever the server says.
    policy: HospitalPolicy = HospitalPolicy()
    #: Hospital only: what its agent may do unattended (``securefl client ... agent``).
    agent: AgentSettings = AgentSettings()

    @model_validator(mode="after")
    def _host_given(self) -> ClientSettings:
        if not self.host:
            raise ValueError("host must not be empty")
        return self


S = TypeVar("S", bound=BaseModel)

_PATH_FIELDS = ("cert", "key", "ca", "crl", "members", "store_dir", "audit_log", "state_dir")


def read_toml(path: Path | str) -> dict[str, Any]:
    """A TOML file as a dict, with one clear error when it is missing or malformed.  The
    only place that parses TOML, and older kits' renamed keys are refused here."""
    path = Path(path)
    try:
        # utf-8-sig: a byte-order mark, which some Windows editors write, is not TOML
        # (walking it: "Invalid statement (at line 1, column 1)" for a file that looked fine).
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError as exc:
        raise ConfigError(f"settings file not found: {path}: check the path given with "
                          "--config") from exc
    except IsADirectoryError as exc:  # a kit's folder instead of the file in it
        inside = sorted(p.name for p in path.glob("*.toml"))
        # Several (the operator's certs folder: admin.toml and server.toml): all named,
        # since only the command knows which it needs (walking it, `server --config certs`
        # was pointed to admin.toml).
        hint = (f"give the settings file inside it, e.g. {path / inside[0]}" if len(inside) == 1
                else "give the one this command needs: "
                + ", ".join(str(path / name) for name in inside) if inside
                else "give the path of a settings file (hospital.toml, admin.toml or "
                "server.toml)")
        raise ConfigError(f"{path} is a folder, not a settings file: {hint}") from exc
    except PermissionError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror}): run as a user who may "
                          "read it, or fix its permissions") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}): fix the file and retry") from exc
    refuse_renamed_keys(path, raw)
    return raw


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a table accepts at ``loc`` (the settings model walked down the path)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        inner = getattr(field, "annotation", None) if field is not None else None
        candidates = [a for a in (inner, *getattr(inner, "__args__", ()))
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _problems(path: Path, exc: ValidationError, prefix: str = "",
              model: type[BaseModel] | None = None) -> ConfigError:
    """One message for every problem; a misspelt key gets the nearest one the table has
    (the pydantic wording "Extra inputs are not permitted" told nobody what to do)."""
    import difflib

    parts = []
    for err in exc.errors():
        where = f"{prefix}{'.'.join(str(p) for p in err['loc'])}"
        if err["type"] == "extra_forbidden" and model is not None:
            known = _known_keys(model, tuple(err["loc"]))
            near = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.6)
            parts.append(f"{where}: not a setting securefl knows"
                         + (f" (did you mean {near[0]}?)" if near else
                            ": remove it or check its spelling in docs/QUICKSTART.md"))
        else:
            parts.append(f"{where}: {err['msg']}")
    return ConfigError(f"{path}: {'; '.join(parts)}")


def _resolve(base: Path, value: Path) -> Path:
    value = value.expanduser()
    return value if value.is_absolute() else (base / value).resolve()


def _resolve_ml(base: Path, ml: MLSettings) -> MLSettings:
    return ml.model_copy(update={"scans_dir": _resolve(base, ml.scans_dir),
                                 "model_dir": _resolve(base, ml.model_dir)})


#: Keys only a server's settings have, and keys only a hospital's or the admin's have.
_SERVER_ONLY = frozenset({"store_dir", "audit_log", "hospitals", "round", "model", "limits",
                          "server_opt", "schedule"})
_CLIENT_ONLY = frozenset({"state_dir", "ml", "policy", "agent"})


def _refuse_the_other_kind(path: Path, raw: dict, model: type[BaseModel]) -> None:
    """Name the mix-up when a server's settings file is given to a client command or the
    reverse.  Why: walking it, ``client --config server.toml`` got a list of "not a setting
    securefl knows (did you mean state_dir?)", which reads as a typo to fix."""
    keys = set(raw)
    if model is ClientSettings and keys & _SERVER_ONLY and not keys & _CLIENT_ONLY:
        raise ConfigError(f"{path} is the server's settings file, not a hospital's or the "
                          "administrator's: give a hospital's hospital.toml (its kit) to "
                          "`securefl client`, or admin.toml to `securefl admin`")
    # admin.toml has no key of its own kind (host, port, cert, key, ca): without the
    # server's crl it was refused as "crl: Field required" (a walk).
    if model is ServerSettings and not keys & _SERVER_ONLY and (
            keys & _CLIENT_ONLY or "crl" not in keys):
        raise ConfigError(f"{path} is a hospital's or the administrator's settings file, not "
                          "the server's: give server.toml to `securefl server`")
    # The [ml] header line deleted or mistyped: its keys land at the top level, and each
    # was listed as "not a setting securefl knows" (13 clauses, walking it).
    ml_keys = sorted(keys & set(MLSettings.model_fields) - set(model.model_fields))
    if model is ClientSettings and len(ml_keys) >= 2:
        raise ConfigError(f"{path} has [ml] settings ({', '.join(ml_keys[:4])}"
                          f"{', …' if len(ml_keys) > 4 else ''}) outside the [ml] table: put "
                          "the line [ml] above them")


def load(path: Path | str, model: type[S]) -> S:
    """Read a TOML settings file into ``model``; relative paths are taken from its folder."""
    path = Path(path)
    raw = read_toml(path)
    try:
        result = model.model_validate(raw)
    except ValidationError as exc:
        _refuse_the_other_kind(path, raw, model)
        raise _problems(path, exc, model=model) from exc
    base = path.resolve().parent
    updates: dict[str, Any] = {}
    for key in _PATH_FIELDS:
        value = getattr(result, key, None)
        if isinstance(value, Path) and not value.is_absolute():
            updates[key] = (path.parent / value).resolve()
    ml = getattr(result, "ml", None)
    if isinstance(ml, MLSettings):
        updates["ml"] = _resolve_ml(base, ml)
    return result.model_copy(update=updates)


#: What to do about a hospital.toml without its [ml] table.  Why not "add scans_dir and
#: model_dir": walking it, that left image_size at its default (128) beside a server at 64.
ML_TABLE_ADVICE = ("copy the [ml] table from the hospital.toml of the kit the federation "
                   "operator gave you (it holds the federation's image_size, model_kind and "
                   "classes, which must match the server's), then set scans_dir and model_dir")


def load_ml_settings(path: Path | str) -> MLSettings:
    """Only the ``[ml]`` table of a hospital file (the ML commands need no certificates, so
    a file with just ``[ml]`` is enough for them)."""
    path = Path(path)
    table = read_toml(path).get("ml")
    if not isinstance(table, dict):
        raise ConfigError(f"{path} has no [ml] table: {ML_TABLE_ADVICE}")
    try:
        ml = MLSettings.model_validate(table)
    except ValidationError as exc:
        raise _problems(path, exc, "ml.", model=MLSettings) from exc
    return _resolve_ml(path.resolve().parent, ml)


def _plain(value: Any) -> Any:
    """Paths and tuples as TOML knows them; ``None`` (no TOML value) leaves the key out."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(mode="json", exclude_none=True))
    return value


def toml_text(data: Mapping[str, Any], comment: str | None = None) -> str:
    """``data`` as TOML, after ``comment`` as ``#`` lines (kits explain themselves to the IT
    staff who install them).  Keys keep their order; tables follow the plain keys."""
    head = ""
    if comment:
        head = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines()) + "\n"
    return head + tomli_w.dumps(_plain(data))


def write_toml(path: Path | str, data: Mapping[str, Any], comment: str | None = None) -> Path:
    """Write a settings file atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(toml_text(data, comment), encoding="utf-8")
    os.replace(tmp, path)
    return path
