"""Direct checkpoint hand-over: a provider accepts an upload from another
provider only with a grant signed by a consumer it holds an agreement with."""

from __future__ import annotations

import os

from synord.protocols.envelope import seal
from synord.protocols.identity import Identity
from synord.protocols.negotiation import Terms
from synord.home import Home
from synord.jobs.provider import ProviderJobs
from synord.store import Store


def make_terms(consumer: Identity, provider: Identity) -> Terms:
    return Terms(aid=os.urandom(16), nid=os.urandom(16), consumer=consumer.peer_id,
                 provider=provider.peer_id, ask_id="cpu", ask_seq=1, bid_id="b", bid_seq=1,
                 resource_class="cpu", cores=1.0, memory=1 << 28, gpus=0, gpu_class=None,
                 runtime="wasm", price=0.01, units=1.0, duration_s=600, heartbeat_ms=2000,
                 created=0, expires=600_000)


def test_grants_are_checked(tmp_path):
    me, consumer, old, stranger = (Identity.generate() for _ in range(4))
    home = Home(tmp_path)
    jobs = ProviderJobs(me, Store(tmp_path / "db"), home, {}, on_finished=lambda *a: None)
    jobs.agreement_made(make_terms(consumer, me))

    def offer(grant_by: Identity, to: str, frm: str, job: str = "j1", kind: str = "checkpoint"):
        grant = seal(grant_by, "blob.grant", {"job_id": "j1", "from": frm, "to": to}).encode()
        return {"sha256": "0" * 64, "size": 1, "kind": kind, "job_id": job, "grant": grant}

    assert jobs._check_grant(old.peer_id, offer(consumer, me.peer_id, old.peer_id)) is None
    assert "another transfer" in jobs._check_grant(old.peer_id, offer(consumer, stranger.peer_id, old.peer_id))
    assert "another transfer" in jobs._check_grant(stranger.peer_id, offer(consumer, me.peer_id, old.peer_id))
    assert "another transfer" in jobs._check_grant(old.peer_id, offer(consumer, me.peer_id, old.peer_id, job="j2"))
    assert "another transfer" in jobs._check_grant(old.peer_id, offer(consumer, me.peer_id, old.peer_id,
                                                                       kind="artifact"))
    assert "no agreement" in jobs._check_grant(old.peer_id, offer(stranger, me.peer_id, old.peer_id))
    forged = offer(consumer, me.peer_id, old.peer_id)
    forged["grant"] = forged["grant"].replace(b"j1", b"j9")  # tampered after signing
    assert "invalid" in jobs._check_grant(old.peer_id, forged)
    replayed = offer(consumer, me.peer_id, old.peer_id)
    assert jobs._check_grant(old.peer_id, replayed) is None
    assert "invalid" in jobs._check_grant(old.peer_id, replayed)  # a grant is good for one upload
