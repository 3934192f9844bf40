"""Between wire messages and the crypto core's round messages (``securefl.crypto.messages``).

Why a separate module: the crypto core knows nothing of frames, and the wire models know
nothing of round objects; this is the single place where the two vocabularies meet, so a
change on either side shows up here and in its round-trip tests.  Identity-bearing fields
(``name``, ``cert_der``) are never read from the peer's message: the server passes in what
the TLS certificate says.
"""

from __future__ import annotations

import numpy as np

from securefl.crypto import messages as cm
from securefl.crypto.quantize import Encoding
from securefl.protocol import messages as wm


def advertisement_from_wire(
    msg: wm.Advertise, *, name: str, base_version: int, cert_der: bytes
) -> cm.KeyAdvertisement:
    return cm.KeyAdvertisement(
        round_id=msg.round_id, base_version=base_version, name=name, c_pk=msg.c_pk,
        s_pk=msg.s_pk, cert_der=cert_der, signature=msg.signature,
        base_sha256=msg.base_sha256, graph_commit=msg.graph_commit,
    )


def advertisement_to_wire(adv: cm.KeyAdvertisement, rid: int = 0) -> wm.Advertise:
    return wm.Advertise(rid=rid, round_id=adv.round_id, c_pk=adv.c_pk, s_pk=adv.s_pk,
                        signature=adv.signature, base_sha256=adv.base_sha256,
                        graph_commit=adv.graph_commit)


def roster_to_wire(roster: cm.Roster) -> wm.RosterMsg:
    c, enc = roster.config, roster.config.encoding
    return wm.RosterMsg(
        round_id=c.round_id, base_version=c.base_version, vector_len=c.vector_len,
        threshold=c.threshold, neighbours=c.neighbours,
        ring_bits=enc.ring_bits, clip=enc.clip, scale=enc.scale, max_clients=enc.max_clients,
        max_weight=enc.max_weight, min_contributors=c.min_contributors,
        participants=[
            wm.Participant(name=p.name, c_pk=p.c_pk, s_pk=p.s_pk, cert_der=p.cert_der,
                           signature=p.signature, base_sha256=p.base_sha256,
                           graph_commit=p.graph_commit)
            for p in roster.participants
        ],
    )


def roster_from_wire(msg: wm.RosterMsg) -> cm.Roster:
    enc = Encoding(msg.ring_bits, msg.clip, msg.scale, msg.max_clients, msg.max_weight)
    config = cm.RoundConfig(
        round_id=msg.round_id, base_version=msg.base_version, vector_len=msg.vector_len,
        threshold=msg.threshold, neighbours=msg.neighbours,
        encoding=enc, min_contributors=msg.min_contributors,
    )
    parts = tuple(
        cm.KeyAdvertisement(
            round_id=msg.round_id, base_version=msg.base_version, name=p.name, c_pk=p.c_pk,
            s_pk=p.s_pk, cert_der=p.cert_der, signature=p.signature,
            base_sha256=p.base_sha256, graph_commit=p.graph_commit,
        )
        for p in msg.participants
    )
    return cm.Roster(config=config, participants=parts)


def roster_ack_to_wire(ack: cm.RosterAck, rid: int = 0) -> wm.AckRoster:
    return wm.AckRoster(rid=rid, round_id=ack.round_id, signature=ack.signature)


def roster_ack_from_wire(msg: wm.AckRoster, *, sender: int) -> cm.RosterAck:
    return cm.RosterAck(round_id=msg.round_id, sender=sender, signature=msg.signature)


def roster_acks_to_wire(acks: cm.RosterAcks) -> wm.RosterAcksMsg:
    return wm.RosterAcksMsg(round_id=acks.round_id, signatures=dict(acks.signatures))


def roster_acks_from_wire(msg: wm.RosterAcksMsg) -> cm.RosterAcks:
    return cm.RosterAcks(round_id=msg.round_id, signatures=dict(msg.signatures))


def seed_reveal_to_wire(rev: cm.SeedReveal, rid: int = 0) -> wm.RevealSeed:
    return wm.RevealSeed(rid=rid, round_id=rev.round_id, value=rev.value)


def seed_reveal_from_wire(msg: wm.RevealSeed, *, sender: int) -> cm.SeedReveal:
    return cm.SeedReveal(round_id=msg.round_id, sender=sender, value=msg.value)


def seed_reveals_to_wire(revs: cm.SeedReveals) -> wm.SeedRevealsMsg:
    return wm.SeedRevealsMsg(round_id=revs.round_id, values=dict(revs.values))


def seed_reveals_from_wire(msg: wm.SeedRevealsMsg) -> cm.SeedReveals:
    return cm.SeedReveals(round_id=msg.round_id, values=dict(msg.values))


def share_keys_to_wire(sk: cm.ShareKeys, rid: int = 0) -> wm.ShareKeysMsg:
    return wm.ShareKeysMsg(rid=rid, round_id=sk.round_id, envelopes=dict(sk.envelopes),
                           digests=dict(sk.digests), b_commit=sk.b_commit)


def share_keys_from_wire(msg: wm.ShareKeysMsg, *, sender: int) -> cm.ShareKeys:
    return cm.ShareKeys(round_id=msg.round_id, sender=sender, envelopes=dict(msg.envelopes),
                        digests=dict(msg.digests), b_commit=msg.b_commit)


def bundle_to_wire(bundle: cm.EnvelopeBundle) -> wm.EnvelopesMsg:
    return wm.EnvelopesMsg(round_id=bundle.round_id, recipient=bundle.recipient,
                           envelopes=dict(bundle.envelopes), digests=dict(bundle.digests))


def bundle_from_wire(msg: wm.EnvelopesMsg) -> cm.EnvelopeBundle:
    return cm.EnvelopeBundle(round_id=msg.round_id, recipient=msg.recipient,
                             envelopes=dict(msg.envelopes), digests=dict(msg.digests))


def masked_input_from_wire(
    msg: wm.MaskedInputMsg, y: np.ndarray, *, sender: int
) -> cm.MaskedInput:
    return cm.MaskedInput(round_id=msg.round_id, sender=sender, y=y)


def survivor_list_to_wire(req: cm.ConsistencyRequest) -> wm.SurvivorListMsg:
    return wm.SurvivorListMsg(round_id=req.round_id, survivors=list(req.survivors))


def survivor_list_from_wire(msg: wm.SurvivorListMsg) -> cm.ConsistencyRequest:
    return cm.ConsistencyRequest(round_id=msg.round_id, survivors=tuple(msg.survivors))


def signature_to_wire(sig: cm.ConsistencySignature, rid: int = 0) -> wm.SignSurvivors:
    return wm.SignSurvivors(rid=rid, round_id=sig.round_id, signature=sig.signature)


def signature_from_wire(msg: wm.SignSurvivors, *, sender: int) -> cm.ConsistencySignature:
    return cm.ConsistencySignature(round_id=msg.round_id, sender=sender,
                                   signature=msg.signature)


def unmask_request_to_wire(req: cm.UnmaskRequest) -> wm.UnmaskRequestMsg:
    return wm.UnmaskRequestMsg(round_id=req.round_id, survivors=list(req.survivors),
                               signatures=dict(req.signatures))


def unmask_request_from_wire(msg: wm.UnmaskRequestMsg) -> cm.UnmaskRequest:
    return cm.UnmaskRequest(round_id=msg.round_id, survivors=tuple(msg.survivors),
                            signatures=dict(msg.signatures))


def unmask_response_to_wire(resp: cm.UnmaskResponse, rid: int = 0) -> wm.UnmaskResponseMsg:
    return wm.UnmaskResponseMsg(rid=rid, round_id=resp.round_id, b_shares=dict(resp.b_shares),
                                s_shares=dict(resp.s_shares))


def unmask_response_from_wire(msg: wm.UnmaskResponseMsg, *, sender: int) -> cm.UnmaskResponse:
    return cm.UnmaskResponse(round_id=msg.round_id, sender=sender, b_shares=dict(msg.b_shares),
                             s_shares=dict(msg.s_shares))
