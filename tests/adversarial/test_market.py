"""The market under attack, through the wire, against real daemons (issue 12,
items 5 and 7): a provider flooding the book with price-0 asks that never
answer, a provider signing an agreement above its own ask, and receipts that
over-bill time and amount.  Each asserts the refusal, that it is counted in
/metrics, and that honest service goes on.
"""

from __future__ import annotations

import dataclasses

import trio

from adversarial.hostile_provider import HostileProvider
from adversarial.hostile import in_thread, refused
from daemons import wait_for
from jobs_helpers import CONSUMER_ONLY, PROBE_WASM, ensure_assets, job, providers_in_book, submit, wait_job
from synord.protocols.receipts import SignedReceipt, issue


def peer(d) -> str:
    return d.status()["peer_id"]


async def _attacker_in_book(evil: HostileProvider, consumer, asks) -> None:
    await evil.connect((await in_thread(consumer.p2p_addrs))[0])
    evil.publish(asks)
    await in_thread(wait_for, lambda: evil.peer_id in providers_in_book(consumer), 40,
                    what="the attacker's asks in the consumer's book")


async def test_price_zero_asks_that_never_answer_do_not_deny_service(cluster):
    ensure_assets()
    # A back-off longer than the test: the second job must not depend on how fast it comes.
    consumer = await in_thread(cluster.start, "consumer", config=CONSUMER_ONLY + "[market]\nbackoff_s = 120.0\n")
    honest = await in_thread(cluster.start, "honest", bootstrap=await in_thread(consumer.p2p_addrs),
                             config="[contributor]\ncpu_share = 0.5\n")
    honest_id = await in_thread(peer, honest)
    await in_thread(wait_for, lambda: honest_id in providers_in_book(consumer), 40, what="the honest ask")
    async with HostileProvider.running() as evil:
        evil.serve()
        evil.answer = "silent"
        # 20 asks at price 0, announcing 1000x performance: they would rank first.
        await _attacker_in_book(evil, consumer, [evil.make_ask(f"z{i}", price=0.0) for i in range(20)])
        await in_thread(wait_for, lambda: refused(consumer, "book", "peer_quota") >= 4, 20,
                        what="asks past the per-peer cap refused")
        held = await in_thread(lambda: sum(a["peer"] == evil.peer_id for a in
                                           consumer.get("/v1/book")["classes"]["cpu"]["asks"]))
        assert held == 16  # market.max_asks_per_peer
        job_id = await in_thread(submit, consumer, str(PROBE_WASM), "--", "hello")
        j = await in_thread(wait_job, consumer, job_id, timeout=60)
        # Placed on the honest provider (placement_timeout_s bounds the time: the job
        # would have failed past it); the liar got one proposal, then a withdrawal.
        assert j["state"] == "succeeded" and j["provider"] == honest_id, j
        proposals = evil.got("propose")
        assert len(proposals) == 1, proposals
        assert [r["reason"] for r in evil.got("reject")] == ["withdrawn"]
        # Its silence is counted and backs it off; the next job does not wait for it.
        await in_thread(wait_for, lambda: refused(consumer, "negotiate", "no_answer") >= 1, 20,
                        what="the silence counted")
        assert evil.peer_id in (await in_thread(consumer.get, "/v1/book"))["backed_off"]
        second = await in_thread(submit, consumer, str(PROBE_WASM), "--", "hello")
        j2 = await in_thread(wait_job, consumer, second, timeout=60)
        assert j2["state"] == "succeeded" and j2["provider"] == honest_id, (j2["error"], j2["history"])
        assert len(evil.got("propose")) == 1  # not proposed to while backed off


async def test_agreement_above_the_ask_is_never_countersigned(cluster):
    ensure_assets()
    consumer = await in_thread(cluster.start, "consumer",
                               config=CONSUMER_ONLY + "[jobs]\nplacement_timeout_s = 4.0\n")
    async with HostileProvider.running() as evil:
        evil.serve()
        evil.answer, evil.overprice = "overprice", 1e6
        await _attacker_in_book(evil, consumer, [evil.make_ask("cheap", price=0.0001)])
        # The user sets no real limit of their own: the matched ask is the limit.
        res = await in_thread(consumer.cli, "run", "--detach", "--json", "--max-price", "1e9",
                              str(PROBE_WASM), "--", "hello")
        import json
        job_id = json.loads(res.stdout)["id"]
        j = await in_thread(wait_job, consumer, job_id, timeout=60)
        assert j["state"] == "failed" and "price" in j["error"], j
        assert evil.got("propose") and evil.got("countersign") == []
        assert {r["reason"] for r in evil.got("reject")} == {"bad_agreement"}
        assert await in_thread(refused, consumer, "negotiate", "agreement_price") >= 1
        assert (await in_thread(consumer.get, "/v1/ledger"))["receipts"] == []


async def test_receipts_over_billing_time_or_amount_are_refused(cluster):
    ensure_assets()
    consumer = await in_thread(cluster.start, "consumer", config=CONSUMER_ONLY)
    cid = await in_thread(peer, consumer)
    async with HostileProvider.running() as evil:
        evil.serve()
        evil.answer = "honest"  # a real agreement at its ask; the lie comes with the bill
        await _attacker_in_book(evil, consumer, [evil.make_ask("a1", price=0.0001)])
        job_id = await in_thread(submit, consumer, str(PROBE_WASM), "--", "hello")
        j = await in_thread(wait_job, consumer, job_id, timeout=60)
        assert j["state"] == "succeeded" and j["provider"] == evil.peer_id, j
        (terms,) = evil.agreed
        t0, ran_until = terms.created, evil.exit_at

        def ledger() -> list:
            return consumer.get("/v1/ledger")["receipts"]

        # 1. the whole lease (an hour) billed for a task that ran 0.1 s
        whole = issue(evil.identity, terms, cpu_s=0.1, peak_memory=1 << 20, started=t0,
                      ended=t0 + terms.duration_s * 1000)
        await evil.send_receipt(cid, whole)
        await in_thread(wait_for, lambda: refused(consumer, "receipt", "over_observed") >= 1, 20,
                        what="the whole-lease receipt refused")
        # 2. the right time, ten times the amount (a tiny receipt: 0.0001 per unit-hour)
        fair = issue(evil.identity, terms, cpu_s=0.1, peak_memory=1 << 20, started=t0, ended=ran_until)
        x10 = dataclasses.replace(fair.receipt, amount=fair.receipt.amount * 10)
        await evil.send_receipt(cid, SignedReceipt(x10, evil.identity.sign(x10.signing_input())))
        await in_thread(wait_for, lambda: refused(consumer, "receipt", "amount") >= 1, 20,
                        what="the x10 receipt refused")
        assert await in_thread(ledger) == [] and evil.got("receipt_ack") == []
        # 3. the honest receipt is countersigned: the refusals were about the bill, not the pipe
        await evil.send_receipt(cid, fair)
        (rec,) = await in_thread(wait_for, ledger, 20, what="the fair receipt in the ledger")
        assert rec["amount"] == fair.receipt.amount and rec["wall_s"] == fair.receipt.wall_s
        await trio.sleep(0.5)
        assert len(evil.got("receipt_ack")) == 1
        assert job(consumer, job_id)["state"] == "succeeded"
