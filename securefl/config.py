"""Settings for the server, a hospital and the admin, read from TOML files.

Why pydantic models and not a dict: a typo in a settings file must stop the program before
it listens or connects (``extra="forbid"``), with a message naming the file and the field.
Relative paths are resolved against the settings file's own folder, so a hospital kit can
be copied anywhere and still work.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from securefl.errors import ConfigError
from securefl.fedopt import ServerOptSettings
from securefl.ml.settings import refuse_renamed_keys


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
    max_connections: int = Field(256, ge=1)
    max_header_bytes: int = Field(1 << 20, ge=1024)
    #: Extra room over the model's own size for a frame's payload.
    max_payload_bytes: int = Field(1 << 30, ge=1024)


class RoundSettings(_Settings):
    """How a secure-aggregation round is formed."""

    min_clients: int = Field(2, ge=2)
    #: After this many seconds with at least ``min_clients`` joined, enrolment closes.
    enrolment_timeout: float = Field(30.0, gt=0)
    #: Longest wait for the hospitals' key shares and unmask answers before going on
    #: without the silent ones (they count as dropped).
    step_timeout: float = Field(60.0, gt=0)
    #: SecAgg+ neighbours per hospital (None: every pair, classic SecAgg).
    neighbours: int | None = Field(None, ge=2)
    #: "secagg" masks every input; "plain" runs the same transport without masks (benchmark
    #: baseline only: the server then sees each hospital's update).
    masking: str = Field("secagg", pattern="^(secagg|plain)$")
    clip: float = Field(1.0, gt=0)
    max_weight: int = Field(10_000, ge=1)
    max_clients: int = Field(100, ge=2)
    #: A round that cannot be unmasked is retried at once with the hospitals still online,
    #: at most this many times in a row (0: report and stop).
    max_retries: int = Field(2, ge=0, le=10)


class ModelSettings(_Settings):
    """The initial global model: a seeded vector (``params``) or the ML spec (``ml``)."""

    params: int | None = Field(None, ge=1)
    seed: int = 0
    init_scale: float = Field(0.05, ge=0)
    #: Left open for ``securefl.ml.settings`` (the ML engineer's model spec).
    ml: dict[str, Any] | None = None


class TLSFiles(_Settings):
    cert: Path
    key: Path
    ca: Path


class ServerSettings(TLSFiles):
    host: str = "127.0.0.1"
    port: int = Field(9095, ge=0, le=65535)
    crl: Path
    store_dir: Path = Path("store")
    audit_log: Path = Path("audit.jsonl")
    #: Registered hospitals: enrolment closes at once when all of them have joined.
    hospitals: list[str] = Field(default_factory=list)
    limits: Limits = Limits()
    round: RoundSettings = RoundSettings()
    model: ModelSettings = ModelSettings()
    #: How a round's mean update is applied (securefl.fedopt; FedAvgM by default).
    server_opt: ServerOptSettings = ServerOptSettings()


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
    ml: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _host_given(self) -> ClientSettings:
        if not self.host:
            raise ValueError("host must not be empty")
        return self


S = TypeVar("S", bound=BaseModel)

_PATH_FIELDS = ("cert", "key", "ca", "crl", "store_dir", "audit_log", "state_dir")


def load(path: Path | str, model: type[S]) -> S:
    """Read a TOML settings file into ``model``; relative paths are taken from its folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"settings file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    refuse_renamed_keys(path, raw)
    try:
        result = model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc
    updates = {}
    for key in _PATH_FIELDS:
        value = getattr(result, key, None)
        if isinstance(value, Path) and not value.is_absolute():
            updates[key] = (path.parent / value).resolve()
    return result.model_copy(update=updates)
