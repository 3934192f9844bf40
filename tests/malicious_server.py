"""A scripted securefl server that deviates from the protocol, over real mutual TLS.

Why a server of its own rather than a patched ``securefl.server``: the hospital's defences
must hold against *any* server, including one that never runs our server code.  This one
speaks protocol 4 with the federation's real server certificate (TLS 1.3, client
certificates required, the same frames and wire messages) and does whatever a test's script
says: answer honestly, run the real ``ServerRound`` for the honest parts, or change,
replay, withhold or split any message it sends.  The hospitals on the other end are the
real, unmodified ``Hospital`` / ``HospitalSession``.

What the server collects (masked inputs, the shares hospitals reveal, everything a colluding
hospital knows) goes into ``Loot``, whose ``recover`` is the adversary's best attempt at one
hospital's update: strip its self mask and every pairwise mask with the secrets it holds.
A test shows a defence works by the hospital's refusal *and* by ``recover`` coming back
empty; ``recover`` succeeding in the split-view test whose hospitals assume too few
colluders shows the arithmetic is the real one.

Layout of one script::

    server = ScriptedServer(fed.certs, weights)        # await server.start(); server.port
    peers = [await server.peer(n) for n in names]       # hospitals that said hello
    rnd = ScriptedRound(server, 1, peers)
    await rnd.enrol()                                   # join -> joined, advertise -> ack
    await rnd.send_roster(tamper=...)                   # every push has a tamper hook
    ...
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securefl.certs import CertDir
from securefl.crypto import messages as cm
from securefl.crypto import pki, shamir
from securefl.crypto.keys import KeyPair, sign, survivors_statement
from securefl.crypto.prg import MaskBuffer, derive_seed
from securefl.crypto.quantize import Encoding
from securefl.crypto.secagg import ClientRound, ServerRound
from securefl.crypto.secagg.common import PAIR_MASK, SELF_MASK, roster_digest, round_context
from securefl.crypto.secagg.policy import RoundPolicy
from securefl.errors import CryptoError, SecureFLError
from securefl.protocol import frames, mapping
from securefl.protocol import messages as wm
from securefl.server.tls import server_context

#: How long a script waits for a hospital's next message before the test fails.
STEP_TIMEOUT = 20.0


class Peer:
    """One hospital's TLS connection, as the script sees it.

    ``hello``, ``get_global`` and ``status`` are answered by the server itself; every other
    request lands in ``next()``.  ``requests`` keeps every message the hospital sent and
    ``wire`` every byte of its frames (to show what never left it).
    """

    def __init__(self, server: ScriptedServer, name: str, cert_der: bytes,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server, self.name, self.cert_der = server, name, cert_der
        self._reader, self._writer = reader, writer
        self._inbox: asyncio.Queue[tuple[wm.Message, np.ndarray | None] | None] = \
            asyncio.Queue()
        self._lock = asyncio.Lock()
        self.requests: list[wm.Message] = []
        self.wire = bytearray()

    @property
    def kinds(self) -> list[str]:
        return [m.kind for m in self.requests]

    async def run(self) -> None:
        parser = frames.FrameParser()
        try:
            while data := await self._reader.read(1 << 16):
                parser.receive_data(data)
                while (frame := parser.next_frame()) is not frames.NEED_DATA:
                    assert isinstance(frame, frames.Frame)
                    self.wire += frame.header + bytes(frame.payload)
                    msg, array = wm.decode(frame)
                    self.requests.append(msg)
                    await self._answer_or_queue(msg, array)
        except (ConnectionError, OSError, ssl.SSLError, SecureFLError):
            pass
        finally:
            self._inbox.put_nowait(None)

    async def _answer_or_queue(self, msg: wm.Message, array: np.ndarray | None) -> None:
        s = self.server
        if isinstance(msg, wm.Hello):
            await self.reply(msg, wm.Welcome(
                name=self.name, role="admin" if self.name == "admin" else "hospital",
                version=s.version,
                resend_round=s.resend.get(self.name), crl=s.crl_der, members=s.members))
            await s.arrived(self)
        elif isinstance(msg, wm.GetGlobal):
            weights = s.models.get(self.name, s.weights)
            await self.reply(msg, wm.GlobalModel(
                version=s.version, sha256=sha256_hex(weights), contributors=0,
                total_samples=0, created="2026-01-01T00:00:00+00:00", classes=[],
                array=wm.ArraySpec.of(weights)), weights)
        elif isinstance(msg, wm.Status):
            await self.reply(msg, wm.StatusReply(version=s.version, round_id=0, phase="idle",
                                                 online=[], joined=[], submitted=[],
                                                 collected=0))
        else:
            self._inbox.put_nowait((msg, array))

    async def next(self, timeout: float = STEP_TIMEOUT
                   ) -> tuple[wm.Message, np.ndarray | None] | None:
        """The hospital's next round request, or None once it hung up."""
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"hospital '{self.name}' sent nothing for {timeout:g} s "
                                 f"(it sent {self.kinds})") from None
        if item is None:
            self._inbox.put_nowait(None)  # every later call sees the hang-up too
        return item

    async def push(self, msg: wm._Wire, array: np.ndarray | None = None) -> bool:
        """Send one frame; False when the hospital is already gone."""
        header = wm.encode_header(msg)
        payload = b"" if array is None else np.ascontiguousarray(array).tobytes()
        async with self._lock:
            try:
                self._writer.write(frames.encode_frame(header, payload))
                await self._writer.drain()
            except (ConnectionError, OSError, ssl.SSLError):
                return False
        return True

    async def reply(self, req: wm._Wire, msg: wm._Wire, array: np.ndarray | None = None
                    ) -> bool:
        return await self.push(msg.model_copy(update={"rid": req.rid}), array)

    async def ack(self, req: wm._Wire) -> bool:
        return await self.reply(req, wm.Ack())

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 2.0)


def sha256_hex(weights: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(weights, dtype="<f4").data).hexdigest()


class ScriptedServer:
    """The listening side: real server certificate, mutual TLS 1.3, our frames."""

    def __init__(self, certs: CertDir, weights: np.ndarray, *, version: int = 0,
                 encoding: Encoding | None = None) -> None:
        self.certs = certs
        self.weights = np.ascontiguousarray(weights, dtype="<f4")
        self.version = version
        self.sha256 = sha256_hex(self.weights)
        self.encoding = encoding or Encoding.auto(clip=1.0, max_clients=100, max_weight=10_000)
        self.ca_cert = pki.load_cert(certs.ca_cert.read_bytes())
        self.crl_der = x509.load_pem_x509_crl(certs.crl.read_bytes()).public_bytes(
            serialization.Encoding.DER)
        self.members = certs.members.read_bytes()
        #: Other model bytes for some hospitals (attack 8: one version, different weights).
        self.models: dict[str, np.ndarray] = {}
        #: ``welcome.resend_round`` per hospital (what a restarted server tells them).
        self.resend: dict[str, int] = {}
        self.port = 0
        self._server: asyncio.Server | None = None
        self._peers: dict[str, list[Peer]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Condition()

    async def start(self) -> int:
        root = self.certs.root
        ctx = server_context(root / "server.pem", root / "server.key", self.certs.ca_cert,
                             self.certs.crl)
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0, ssl=ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        await self.drop_all()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> ScriptedServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        _, name = pki.identity_of(x509.load_der_x509_certificate(der))
        peer = Peer(self, name, der, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await peer.run()
        finally:
            self._tasks.discard(task)
            writer.close()

    async def arrived(self, peer: Peer) -> None:
        async with self._changed:
            self._peers.setdefault(peer.name, []).append(peer)
            self._changed.notify_all()

    async def peer(self, name: str, nth: int = 1, timeout: float = STEP_TIMEOUT) -> Peer:
        """The ``nth`` connection of hospital ``name`` that said hello (waits for it)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: len(self._peers.get(name, [])) >= nth), timeout)
            except TimeoutError:
                raise AssertionError(f"hospital '{name}' did not connect (connection "
                                     f"{nth})") from None
            return self._peers[name][nth - 1]

    async def drop_all(self) -> None:
        """Close every connection (what a server restart looks like to the hospitals)."""
        for peers in self._peers.values():
            for p in peers:
                await p.close()

    def joined(self, round_id: int, masking: str = "secagg",
               encoding: Encoding | None = None) -> wm.Joined:
        e = encoding or self.encoding
        return wm.Joined(round_id=round_id, base_version=self.version,
                         vector_len=int(self.weights.shape[0]),
                         masking=masking,  # type: ignore[arg-type]
                         ring_bits=e.ring_bits, clip=e.clip, scale=e.scale,
                         max_clients=e.max_clients, max_weight=e.max_weight)


class Puppet:
    """A hospital in the server's pay, run in-process with a real CA-issued certificate: it
    follows the protocol where that suits the server, signs whatever the server asks, and
    hands the server everything it knows (``Loot.take_puppet``)."""

    def __init__(self, cred: pki.Credential, server: ScriptedServer, round_id: int,
                 update: np.ndarray, weight: int = 50) -> None:
        self.cred = cred
        self.name = pki.identity_of(cred.cert)[1]
        self.round = ClientRound(
            cert=cred.cert, signing_key=cred.key, ca_cert=server.ca_cert, round_id=round_id,
            base_version=server.version, update=update, weight=weight,
            base_sha256=bytes.fromhex(server.sha256), policy=RoundPolicy(colluders=0))

    def sign_list(self, roster: cm.Roster, survivors: Sequence[int]) -> bytes:
        """Its signature on any survivor list the server likes (a colluder signs them all)."""
        cfg = roster.config
        return sign(self.cred.key, survivors_statement(
            cfg.round_id, cfg.base_version, roster.participants[0].base_sha256,
            roster_digest(roster), tuple(survivors)))


@dataclass
class Recovery:
    """The adversary's attempt at one hospital's update: the update, or what it lacked."""

    update: np.ndarray | None
    samples: int | None
    missing: str


@dataclass
class Loot:
    """Everything the deviating server holds about one round."""

    roster: cm.Roster | None = None
    #: recipient -> senders whose share envelopes the server delivered to it
    delivered: dict[int, frozenset[int]] = field(default_factory=dict)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    #: owner -> {holder: Shamir share} of its self-mask seed b and of its key s_sk
    b_shares: dict[int, dict[int, int]] = field(default_factory=dict)
    s_shares: dict[int, dict[int, int]] = field(default_factory=dict)
    #: secrets a colluding hospital gave away whole (its own b and s_sk)
    known_b: dict[int, bytes] = field(default_factory=dict)
    known_s: dict[int, bytes] = field(default_factory=dict)

    def take_response(self, holder: int, b_shares: Mapping[int, bytes],
                      s_shares: Mapping[int, bytes]) -> None:
        for owner, raw in b_shares.items():
            self.b_shares.setdefault(owner, {})[holder] = shamir.share_from_bytes(raw)
        for owner, raw in s_shares.items():
            self.s_shares.setdefault(owner, {})[holder] = shamir.share_from_bytes(raw)

    def take_puppet(self, puppet: Puppet) -> None:
        """A colluder's whole state: its own secrets and every share it holds."""
        r = puppet.round
        me = r.me
        self.known_b[me] = r._b
        self.known_s[me] = r._s.private_bytes()
        for owner, (b_share, s_share) in r._held.items():
            self.b_shares.setdefault(owner, {})[me] = b_share
            self.s_shares.setdefault(owner, {})[me] = s_share

    def _b(self, owner: int) -> bytes | None:
        if owner in self.known_b:
            return self.known_b[owner]
        assert self.roster is not None
        pool = self.b_shares.get(owner, {})
        if len(pool) < self.roster.config.threshold:
            return None
        return shamir.reconstruct(pool, self.roster.config.threshold)

    def _s(self, owner: int) -> KeyPair | None:
        assert self.roster is not None
        raw = self.known_s.get(owner)
        pool = self.s_shares.get(owner, {})
        if raw is None and len(pool) >= self.roster.config.threshold:
            try:
                raw = shamir.reconstruct(pool, self.roster.config.threshold)
            except CryptoError:
                return None
        if raw is None:
            return None
        key = KeyPair.from_private_bytes(raw)
        return key if key.public == self.roster.participants[owner - 1].s_pk else None

    def recover(self, target: int) -> Recovery:
        """Strip ``target``'s self mask and pairwise masks with what the server holds."""
        if self.roster is None:
            return Recovery(None, None, "no roster was ever accepted")
        y = self.inputs.get(target)
        if y is None:
            return Recovery(None, None, "its masked input never arrived")
        b = self._b(target)
        if b is None:
            have = len(self.b_shares.get(target, {}))
            return Recovery(None, None, f"its self-mask seed: {have} share(s) of "
                                        f"{self.roster.config.threshold}")
        cfg = self.roster.config
        ctx = round_context(cfg)
        x = y.copy()
        masks = MaskBuffer(x.shape[0], cfg.encoding.dtype)
        masks.subtract(x, derive_seed(b, SELF_MASK, ctx))
        parts = self.roster.participants
        for v in sorted(self.delivered.get(target, frozenset())):
            mine, theirs = self._s(target), self._s(v)
            if mine is not None:
                seed = mine.agree(parts[v - 1].s_pk, PAIR_MASK, ctx)
            elif theirs is not None:
                seed = theirs.agree(parts[target - 1].s_pk, PAIR_MASK, ctx)
            else:
                return Recovery(None, None, f"the pairwise mask with participant {v}: "
                                            "neither key can be rebuilt")
            if target < v:
                masks.subtract(x, seed)
            else:
                masks.add(x, seed)
        signed = x.view(cfg.encoding.signed_dtype)
        weight = int(signed[-1])
        if not 1 <= weight <= cfg.encoding.max_weight:
            return Recovery(None, None, "the unmasked sample count is not a count")
        update, samples = cfg.encoding.decode(x)
        return Recovery(update, samples, "")


Tamper = Callable[[str, wm._Wire], wm._Wire | None]


def _same(name: str, msg: wm._Wire) -> wm._Wire | None:
    return msg


class ScriptedRound:
    """One round as the script runs it: the real ``ServerRound`` underneath for the honest
    parts, a tamper hook on every push (return another message, or None to withhold it),
    and ``Loot`` filled with whatever the hospitals answer.

    Hospitals that hang up (they refused) are noted in ``gone`` and skipped afterwards;
    a hospital that sends anything but the expected next request fails the script.
    """

    def __init__(self, server: ScriptedServer, round_id: int, peers: Iterable[Peer], *,
                 puppets: Iterable[Puppet] = (), colluders: int = 1,
                 threshold: int | None = None, check_sha: bool = True,
                 encoding: Encoding | None = None) -> None:
        """``encoding``: this round's (in ``joined`` and the roster); default the server's."""
        self.server, self.round_id = server, round_id
        self.encoding = encoding or server.encoding
        self.peers = {p.name: p for p in peers}
        self.puppets = {p.name: p for p in puppets}
        self.engine = ServerRound(
            round_id=round_id, base_version=server.version,
            vector_len=int(server.weights.shape[0]), encoding=self.encoding,
            ca_cert=server.ca_cert, threshold=threshold, colluders=colluders,
            base_sha256=bytes.fromhex(server.sha256) if check_sha else None)
        self.loot = Loot()
        self.gone: set[str] = set()
        #: Every roster wire message pushed, per hospital (for replay tests).
        self.rosters: dict[str, wm.RosterMsg] = {}
        self.adverts: dict[str, wm.Advertise] = {}
        #: The honest envelope bundles, by recipient number (for misrouting tests).
        self.bundles: dict[int, cm.EnvelopeBundle] = {}
        self._acks: dict[int, bytes] = {}
        self._drawn = False

    # -- helpers -------------------------------------------------------------------------
    @property
    def live(self) -> list[Peer]:
        return [p for n, p in self.peers.items() if n not in self.gone]

    def index(self, name: str) -> int:
        assert self.engine.roster is not None
        return self.engine.roster.index_of(name)

    async def _next(self, peer: Peer, kind: type[wm._Wire]
                    ) -> tuple[wm._Wire, np.ndarray | None] | None:
        item = await peer.next()
        if item is None:
            self.gone.add(peer.name)
            return None
        msg, array = item
        if not isinstance(msg, kind):
            raise AssertionError(f"hospital '{peer.name}' sent '{msg.kind}' where "
                                 f"'{kind.__name__}' was due")
        return msg, array

    async def _push_each(self, make: Callable[[str], wm._Wire], tamper: Tamper | None
                         ) -> dict[str, wm._Wire]:
        sent = {}
        for peer in self.live:
            msg = (tamper or _same)(peer.name, make(peer.name))
            if msg is not None:
                await peer.push(msg)
                sent[peer.name] = msg
        return sent

    async def expect_gone(self) -> list[str]:
        """Wait until every live hospital hung up; returns those that sent a request
        instead (each one a defence that did not hold)."""
        answered = []
        for peer in self.live:
            item = await peer.next()
            if item is not None:
                answered.append(f"{peer.name}: {item[0].kind}")
            self.gone.add(peer.name)
        return answered

    # -- the steps -----------------------------------------------------------------------
    async def enrol(self, masking: str = "secagg") -> None:
        """join -> joined (every hospital), advertise -> ack; puppets advertise too."""
        for peer in self.live:
            got = await self._next(peer, wm.Join)
            if got is not None:
                await peer.reply(got[0], self.server.joined(self.round_id, masking,
                                                            self.encoding))
        if masking != "secagg":
            return
        for peer in self.live:
            got = await self._next(peer, wm.Advertise)
            if got is None:
                continue
            msg = got[0]
            assert isinstance(msg, wm.Advertise)
            self.adverts[peer.name] = msg
            self.engine.receive(mapping.advertisement_from_wire(
                msg, name=peer.name, base_version=self.server.version,
                cert_der=peer.cert_der), from_name=peer.name)
            await peer.ack(msg)
        for puppet in self.puppets.values():
            self.engine.receive(puppet.round.advertise())

    async def send_roster(self, tamper: Tamper | None = None) -> cm.Roster:
        """Close enrolment (the real roster) and push it, tampered per hospital."""
        roster = self.engine.close_enrolment()
        self.loot.roster = roster
        wire = mapping.roster_to_wire(roster)
        self.rosters = await self._push_each(lambda _: wire, tamper)  # type: ignore[assignment]
        for puppet in self.puppets.values():
            ack = puppet.round.receive(roster)
            self._acks[ack.sender] = ack.signature
            self.engine.receive(ack)
        return roster

    async def draw(self, acks_tamper: Tamper | None = None,
                   reveals_tamper: Tamper | None = None) -> None:
        """Collect the roster acknowledgements, push them all (tampered per hospital),
        collect the graph-seed values, push them all: the graph is drawn.  The bundles
        hold whatever arrived, checked or not, so a hospital shown another roster is
        handed signatures on this one (and refuses)."""
        if self._drawn:
            return
        self._drawn = True
        for peer in self.live:
            got = await self._next(peer, wm.AckRoster)
            if got is None:
                continue
            msg, me = got[0], self.index(peer.name)
            assert isinstance(msg, wm.AckRoster)
            self._acks[me] = msg.signature
            with contextlib.suppress(SecureFLError):
                self.engine.receive(mapping.roster_ack_from_wire(msg, sender=me),
                                    from_name=peer.name)
            await peer.ack(msg)
        acks = cm.RosterAcks(self.round_id, dict(sorted(self._acks.items())))
        with contextlib.suppress(SecureFLError):
            self.engine.close_acks()
        await self._push_each(lambda _: mapping.roster_acks_to_wire(acks), acks_tamper)
        values: dict[int, bytes] = {}
        for puppet in self.puppets.values():
            rev = puppet.round.receive(acks)
            values[rev.sender] = rev.value
            self.engine.receive(rev)
        for peer in self.live:
            got = await self._next(peer, wm.RevealSeed)
            if got is None:
                continue
            rmsg, me = got[0], self.index(peer.name)
            assert isinstance(rmsg, wm.RevealSeed)
            values[me] = rmsg.value
            with contextlib.suppress(SecureFLError):
                self.engine.receive(mapping.seed_reveal_from_wire(rmsg, sender=me),
                                    from_name=peer.name)
            await peer.ack(rmsg)
        reveals = cm.SeedReveals(self.round_id, dict(sorted(values.items())))
        with contextlib.suppress(SecureFLError):
            self.engine.close_reveals()
        await self._push_each(lambda _: mapping.seed_reveals_to_wire(reveals), reveals_tamper)
        for puppet in self.puppets.values():
            self.engine.receive(puppet.round.receive(reveals))

    async def collect_shares(self) -> None:
        await self.draw()
        for peer in self.live:
            got = await self._next(peer, wm.ShareKeysMsg)
            if got is not None:
                msg = got[0]
                assert isinstance(msg, wm.ShareKeysMsg)
                self.engine.receive(mapping.share_keys_from_wire(
                    msg, sender=self.index(peer.name)), from_name=peer.name)
                await peer.ack(msg)

    async def send_envelopes(self, tamper: Tamper | None = None) -> None:
        bundles = self.bundles = self.engine.close_shares()
        for puppet in self.puppets.values():
            me = puppet.round.me
            self.loot.delivered[me] = frozenset(bundles[me].envelopes)
            masked = puppet.round.receive(bundles[me])
            self.loot.inputs[me] = masked.y.copy()
            self.engine.receive(masked)
            self.loot.take_puppet(puppet)
        sent = await self._push_each(
            lambda name: mapping.bundle_to_wire(bundles[self.index(name)]), tamper)
        for name, msg in sent.items():
            assert isinstance(msg, wm.EnvelopesMsg)
            self.loot.delivered[self.index(name)] = frozenset(msg.envelopes)

    async def collect_inputs(self) -> None:
        for peer in self.live:
            got = await self._next(peer, wm.UploadSlot)
            if got is None:
                continue
            await peer.ack(got[0])
            got = await self._next(peer, wm.MaskedInputMsg)
            if got is None:
                continue
            msg, y = got
            assert isinstance(msg, wm.MaskedInputMsg) and y is not None
            me = self.index(peer.name)
            self.loot.inputs[me] = y.copy()
            self.engine.receive(cm.MaskedInput(msg.round_id, me, y.copy()),
                                from_name=peer.name)
            await peer.ack(msg)

    async def send_lists(self, lists: Mapping[str, Sequence[int]] | None = None,
                         tamper: Tamper | None = None) -> cm.ConsistencyRequest | None:
        """The survivor list: the engine's one list for all (``lists`` None), or a list of
        the script's choosing per hospital (split views; the engine is bypassed)."""
        if lists is None:
            req = self.engine.close_inputs()
            wire = mapping.survivor_list_to_wire(req)
            await self._push_each(lambda _: wire, tamper)
            return req
        await self._push_each(lambda n: wm.SurvivorListMsg(
            round_id=self.round_id, survivors=list(lists[n])), tamper)
        return None

    async def collect_signatures(self, *, to_engine: bool = True) -> dict[str, bytes]:
        signatures = {}
        for peer in self.live:
            got = await self._next(peer, wm.SignSurvivors)
            if got is None:
                continue
            msg = got[0]
            assert isinstance(msg, wm.SignSurvivors)
            signatures[peer.name] = msg.signature
            if to_engine:
                self.engine.receive(mapping.signature_from_wire(
                    msg, sender=self.index(peer.name)), from_name=peer.name)
            await peer.ack(msg)
        return signatures

    async def send_unmask(self, requests: Mapping[str, wm.UnmaskRequestMsg] | None = None,
                          tamper: Tamper | None = None) -> None:
        if requests is None:
            reqs = self.engine.close_check()
            anyone = next(iter(reqs.values()))
            await self._push_each(lambda n: mapping.unmask_request_to_wire(
                reqs.get(self.index(n), anyone)), tamper)
        else:
            await self._push_each(lambda n: requests[n], tamper)

    async def collect_responses(self, *, to_engine: bool = True) -> list[str]:
        answered = []
        for peer in self.live:
            got = await self._next(peer, wm.UnmaskResponseMsg)
            if got is None:
                continue
            msg = got[0]
            assert isinstance(msg, wm.UnmaskResponseMsg)
            me = self.index(peer.name)
            self.loot.take_response(me, msg.b_shares, msg.s_shares)
            if to_engine:
                self.engine.receive(mapping.unmask_response_from_wire(msg, sender=me),
                                    from_name=peer.name)
            await peer.ack(msg)
            answered.append(peer.name)
        return answered

    async def publish(self, version: int) -> cm.AggregateResult:
        """The real unmasking (``ServerRound.finish``) and ``round_done`` to everyone."""
        result = self.engine.finish()
        for peer in self.live:
            await peer.push(wm.RoundDone(round_id=self.round_id, version=version,
                                         sha256="0" * 64))
        return result

    async def abandon(self, retry_round: int = 0, *, to: Iterable[str] | None = None) -> None:
        """Announce the round failed (``round_done`` with ``resend``), maybe with a retry."""
        names = set(to) if to is not None else {p.name for p in self.live}
        for peer in self.live:
            if peer.name in names:
                await peer.push(wm.RoundDone(
                    round_id=self.round_id, version=self.server.version, resend=True,
                    retry_round=retry_round, code="too-few-hospitals",
                    message="too few hospitals answered the unmask step"))
