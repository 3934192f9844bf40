"""The hospital's side of one secure-aggregation round, as a sans-I/O state machine.

Typed messages in, typed messages out; no sockets, files or clocks.  The transition table
``CLIENT_TABLE`` is the whole protocol order for this role: anything else raises
``RemoteProtocolError`` (the server sent it) or ``LocalProtocolError`` (we called it).

Bonawitz et al. 2017, Fig. 4, user side:
  round 0  ``advertise()``                    -> KeyAdvertisement
  round 1  ``receive(Roster)``                -> ShareKeys
  round 2  ``receive(EnvelopeBundle)``        -> MaskedInput
  round 3  ``receive(UnmaskRequest)``         -> UnmaskResponse
"""

from __future__ import annotations

import datetime as dt
import os
from enum import Enum
from typing import overload

import numpy as np
from cryptography import x509

from securefl.crypto import envelope, graph, shamir
from securefl.crypto.keys import KeyPair, SigningKey, sign_advertisement, verify_advertisement
from securefl.crypto.membership import MemberList
from securefl.crypto.messages import (
    EnvelopeBundle,
    KeyAdvertisement,
    MaskedInput,
    Roster,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from securefl.crypto.prg import MaskBuffer, derive_seed
from securefl.crypto.quantize import check_update
from securefl.crypto.secagg.common import (
    ENVELOPE_KEY,
    PAIR_MASK,
    SELF_MASK,
    check_config,
    round_context,
    step,
)
from securefl.errors import ConfigError, CryptoError, RemoteProtocolError, StaleVersionError


class ClientState(Enum):
    NEW = "not started"
    ADVERTISED = "waiting for the roster"
    SHARED = "waiting for key shares"
    MASKED = "waiting for the unmask request"
    DONE = "finished"


ADVERTISE = "advertise"

CLIENT_TABLE = {
    ClientState.NEW: {ADVERTISE: ClientState.ADVERTISED},
    ClientState.ADVERTISED: {Roster: ClientState.SHARED},
    ClientState.SHARED: {EnvelopeBundle: ClientState.MASKED},
    ClientState.MASKED: {UnmaskRequest: ClientState.DONE},
}


class ClientRound:
    """One hospital in one round.  Holds its update until it is masked, then forgets it."""

    def __init__(
        self,
        *,
        cert: x509.Certificate,
        signing_key: SigningKey,
        ca_cert: x509.Certificate,
        round_id: int,
        base_version: int,
        update: np.ndarray,
        weight: int,
        now: dt.datetime | None = None,
        min_contributors: int = 2,
        base_sha256: bytes = bytes(32),
        revoked: frozenset[int] = frozenset(),
        members: MemberList | None = None,
    ) -> None:
        """``min_contributors``: the hospital's own floor on how many hospitals a sum it
        helps unmask must combine, whatever the roster says."""
        check_update(update)
        self._min_contributors = max(2, min_contributors)
        self._base_sha256 = base_sha256
        self._revoked = revoked  # certificate serials the CA revoked
        self._members = members  # the operator's signed member list: who may be in a round
        #: Whether the roster's limit lowered this hospital's sample count.
        self.weight_capped = False
        self.state = ClientState.NEW
        self._cert, self._signing_key, self._ca = cert, signing_key, ca_cert
        self.round_id, self.base_version = round_id, base_version
        self._update: np.ndarray | None = update
        self._weight = weight
        self._now = now
        self._c = KeyPair()
        self._s = KeyPair()
        self.me = 0  # participant number, known from the roster
        self.roster: Roster | None = None
        self._neighbours: frozenset[int] = frozenset()
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (share of b, share of s_sk)
        self._envelope_keys: dict[int, bytes] = {}  # neighbour -> AES-GCM key (symmetric)

    # -- round 0 -----------------------------------------------------------------------
    def advertise(self) -> KeyAdvertisement:
        self.state = step(CLIENT_TABLE, self.state, ADVERTISE, remote=False)  # type: ignore[assignment]
        self._own = sign_advertisement(
            self._signing_key,
            self._cert,
            round_id=self.round_id,
            base_version=self.base_version,
            c_pk=self._c.public,
            s_pk=self._s.public,
            base_sha256=self._base_sha256,
        )
        return self._own

    # -- dispatch ----------------------------------------------------------------------
    @overload
    def receive(self, msg: Roster) -> ShareKeys: ...
    @overload
    def receive(self, msg: EnvelopeBundle) -> MaskedInput: ...
    @overload
    def receive(self, msg: UnmaskRequest) -> UnmaskResponse: ...

    def receive(
        self, msg: Roster | EnvelopeBundle | UnmaskRequest
    ) -> ShareKeys | MaskedInput | UnmaskResponse:
        """Feed the server's next message; returns this hospital's answer to send back."""
        nxt = step(CLIENT_TABLE, self.state, type(msg), remote=True)
        if isinstance(msg, Roster):
            out: ShareKeys | MaskedInput | UnmaskResponse = self._on_roster(msg)
        elif isinstance(msg, EnvelopeBundle):
            out = self._on_envelopes(msg)
        else:
            out = self._on_unmask(msg)
        self.state = nxt  # type: ignore[assignment]
        return out

    # -- round 1 -----------------------------------------------------------------------
    def _on_roster(self, roster: Roster) -> ShareKeys:
        cfg = roster.config
        if (cfg.round_id, cfg.base_version) != (self.round_id, self.base_version):
            if cfg.base_version != self.base_version:
                raise StaleVersionError(
                    f"the round aggregates global version {cfg.base_version} but this update "
                    f"was trained from version {self.base_version}: fetch the new model first"
                )
            raise RemoteProtocolError(f"roster is for round {cfg.round_id}, not {self.round_id}")
        if self._members is not None:
            self._members.check_roster(roster.participants)
        n = len(roster.participants)
        check_config(cfg, n)
        assert self._update is not None
        if cfg.vector_len != self._update.shape[0]:
            raise ConfigError(
                f"the server expects {cfg.vector_len} parameters but this model has "
                f"{self._update.shape[0]}: the hospital runs a different model"
            )
        if self._weight < 1:
            raise ConfigError(f"the sample count must be at least 1, not {self._weight}")
        # Capped, not refused: refusing a roster for its max_weight would tell the server
        # one bit of this hospital's count per attempt.
        self.weight_capped = self._weight > cfg.encoding.max_weight
        self._weight = min(self._weight, cfg.encoding.max_weight)
        names = [a.name for a in roster.participants]
        if names != sorted(set(names)):
            raise RemoteProtocolError("roster names are not unique and sorted")
        keys = [a.c_pk for a in roster.participants] + [a.s_pk for a in roster.participants]
        if len(set(keys)) != len(keys):
            raise CryptoError("roster repeats a public key: refusing the round")
        for adv in roster.participants:
            if (adv.round_id, adv.base_version) != (self.round_id, self.base_version):
                raise RemoteProtocolError(f"keys of '{adv.name}' belong to another round")
            if adv.name == self._own.name:
                if adv != self._own:
                    raise CryptoError("the roster altered this hospital's own round keys")
                continue
            if adv.base_sha256 != self._base_sha256:
                raise CryptoError(
                    f"'{adv.name}' was given other model bytes for version "
                    f"{self.base_version} than this hospital: refusing the round (a server "
                    "that shows hospitals different models could learn about one of them)")
            verify_advertisement(adv, self._ca, now=self._now, revoked=self._revoked)
        self.roster = roster
        self.me = roster.index_of(self._own.name)
        self._neighbours = graph.neighbours(n, cfg.neighbours, cfg.graph_seed)[self.me]
        ctx = round_context(cfg)

        b_u = os.urandom(32)
        self._b = b_u
        holders = self._neighbours | {self.me}  # keep a share of our own, as Bonawitz does
        b_shares = shamir.split(b_u, holders, cfg.threshold)
        s_shares = shamir.split(self._s.private_bytes(), holders, cfg.threshold)
        self._held[self.me] = (b_shares[self.me], s_shares[self.me])
        envelopes = {}
        for v in sorted(self._neighbours):
            key = self._c.agree(roster.participants[v - 1].c_pk, ENVELOPE_KEY, ctx)
            self._envelope_keys[v] = key
            envelopes[v] = envelope.seal(
                key,
                round_id=cfg.round_id,
                base_version=cfg.base_version,
                sender=self.me,
                recipient=v,
                b_share=shamir.share_to_bytes(b_shares[v]),
                s_share=shamir.share_to_bytes(s_shares[v]),
            )
        return ShareKeys(cfg.round_id, self.me, envelopes)

    # -- round 2 -----------------------------------------------------------------------
    def _on_envelopes(self, bundle: EnvelopeBundle) -> MaskedInput:
        assert self.roster is not None and self._update is not None
        cfg = self.roster.config
        if bundle.round_id != cfg.round_id or bundle.recipient != self.me:
            raise RemoteProtocolError("share envelopes addressed to another round or hospital")
        senders = set(bundle.envelopes)
        if not senders <= self._neighbours:
            raise RemoteProtocolError("share envelopes from hospitals that are not neighbours")
        if len(senders) + 1 < cfg.threshold:  # our own share counts: we hold it
            # Masking with fewer than t holders' shares would leave the self mask as the
            # only mask on some view a server can unmask (Bonawitz et al. 2017, Fig. 4).
            raise CryptoError(
                f"only {len(senders)} other hospital(s) shared keys with this one; at least "
                f"{cfg.threshold - 1} are needed before it may mask its update: refusing the "
                "round, nothing was sent")
        for u in sorted(senders):
            b_raw, s_raw = envelope.open_envelope(
                self._envelope_keys[u],
                bundle.envelopes[u],
                round_id=cfg.round_id,
                base_version=cfg.base_version,
                sender=u,
                recipient=self.me,
            )
            self._held[u] = (shamir.share_from_bytes(b_raw), shamir.share_from_bytes(s_raw))

        ctx = round_context(cfg)
        enc = cfg.encoding
        y = enc.encode(self._update, self._weight)
        masks = MaskBuffer(y.shape[0], enc.dtype)
        masks.add(y, derive_seed(self._b, SELF_MASK, ctx))
        for v in sorted(senders):  # mask only with neighbours whose shares arrived (U1)
            s_uv = self._s.agree(self.roster.participants[v - 1].s_pk, PAIR_MASK, ctx)
            if self.me < v:
                masks.add(y, s_uv)
            else:
                masks.subtract(y, s_uv)
        self._update = None  # the clear update is no longer needed
        return MaskedInput(cfg.round_id, self.me, y)

    # -- round 3 -----------------------------------------------------------------------
    def _on_unmask(self, req: UnmaskRequest) -> UnmaskResponse:
        assert self.roster is not None
        cfg = self.roster.config
        survivors, dropped = set(req.survivors), set(req.dropped)
        if req.round_id != cfg.round_id:
            raise RemoteProtocolError("unmask request for another round")
        if survivors & dropped:
            raise CryptoError(
                "the server asked for both shares of the same hospital: refusing, as that "
                "would reveal its update"
            )
        everyone = set(range(1, len(self.roster.participants) + 1))
        if not (survivors | dropped) <= everyone:
            # Numbers outside the roster would pad the survivor count past the threshold
            # while every real hospital but one is declared dropped.
            raise CryptoError(
                "the unmask request names hospitals that are not in the round's roster: "
                "refusing, as answering could reveal another hospital's update")
        if self.me not in survivors:
            raise RemoteProtocolError("unmask request does not list this hospital as a survivor")
        needed = max(cfg.threshold, cfg.min_contributors, self._min_contributors)
        if len(survivors) < needed:
            raise CryptoError(
                f"only {len(survivors)} hospital(s) would be combined; at least "
                f"{needed} are needed to keep each one hidden"
            )
        known = set(self._held)
        if not ((survivors | dropped) & self._neighbours <= known):
            raise RemoteProtocolError("unmask request names neighbours that never shared keys")
        b_for = sorted(survivors & known)
        s_for = sorted(dropped & known)
        return UnmaskResponse(
            cfg.round_id,
            self.me,
            {u: shamir.share_to_bytes(self._held[u][0]) for u in b_for},
            {u: shamir.share_to_bytes(self._held[u][1]) for u in s_for},
        )
