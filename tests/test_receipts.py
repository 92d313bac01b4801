"""Usage receipts: issue (provider), countersign (consumer), verify, tampering refused."""

import dataclasses

import pytest

from synord.protocols.envelope import decode, seal
from synord.protocols.receipts import (
    ReceiptError, SignedReceipt, amount_for, check_against, countersign, issue, verify_provider, verify_receipt,
)

from test_negotiation import C_ID, P_ID, T0, X_ID, terms


def signed(**kw):
    return issue(P_ID, terms(), cpu_s=250.5, peak_memory=300 << 20, started=T0, ended=T0 + 120_000, **kw)


def test_issue_countersign_verify():
    sr = signed()
    r = sr.receipt
    assert (r.wall_s, r.price, r.units) == (120.0, 1.5, 2.0)
    assert r.amount == pytest.approx(1.5 * 2 * 120 / 3600) == amount_for(1.5, 2.0, 120.0)
    assert verify_provider(sr) and not verify_receipt(sr)  # not countersigned yet
    full = countersign(C_ID, sr, terms())
    assert verify_receipt(full)
    # through the wire and back
    env = decode(seal(P_ID, "receipt", full.to_body()).encode())
    assert verify_receipt(SignedReceipt.from_body(env.body))


@pytest.mark.parametrize("change", [dict(amount=99.0), dict(cpu_s=1.0), dict(outcome="failed"),
                                    dict(consumer=X_ID.peer_id)])
def test_tampered_receipt_refused(change):
    full = countersign(C_ID, signed(), terms())
    bad = dataclasses.replace(full, receipt=dataclasses.replace(full.receipt, **change))
    assert not verify_receipt(bad) and not verify_provider(bad)
    with pytest.raises(ReceiptError):
        countersign(C_ID, dataclasses.replace(signed(), receipt=bad.receipt), terms())


def test_consumer_checks_receipt_against_agreement():
    # A provider signing an overcharge is caught by the consumer, not just by signatures.
    t = terms()
    over = dataclasses.replace(signed().receipt, amount=10.0)
    sr = SignedReceipt(over, P_ID.sign(over.signing_input()))
    assert verify_provider(sr)
    with pytest.raises(ReceiptError, match="amount"):
        check_against(sr, t)
    pricier = dataclasses.replace(signed().receipt, price=3.0, amount=amount_for(3.0, 2.0, 120.0))
    with pytest.raises(ReceiptError, match="price"):
        check_against(SignedReceipt(pricier, P_ID.sign(pricier.signing_input())), t)
    too_long = issue(P_ID, t, cpu_s=1, peak_memory=1, started=T0, ended=T0 + 3_600_000)
    with pytest.raises(ReceiptError, match="duration"):
        check_against(too_long, t)
    with pytest.raises(ReceiptError, match="only the agreement's consumer"):
        countersign(X_ID, signed(), t)
    with pytest.raises(ReceiptError, match="only the agreement's provider"):
        issue(X_ID, t, cpu_s=1, peak_memory=1, started=T0, ended=T0 + 1)


def test_receipt_body_validation():
    body = countersign(C_ID, signed(), terms()).to_body()
    body["receipt"] = dict(body["receipt"], wall_s=-1.0)
    with pytest.raises(ValueError, match="wall_s"):
        SignedReceipt.from_body(body)
    body["receipt"] = dict(body["receipt"], wall_s=1.0, outcome="great")
    with pytest.raises(ValueError, match="outcome"):
        SignedReceipt.from_body(body)


def test_amount_tolerance_is_relative_even_for_tiny_receipts():
    # 1 s at 0.0001 per unit-hour: 2.8e-8; ten times that is still wrong.
    t = terms(price=0.0001, units=1.0)
    fair = issue(P_ID, t, cpu_s=1, peak_memory=1, started=T0, ended=T0 + 1000)
    check_against(fair, t)
    x10 = dataclasses.replace(fair.receipt, amount=fair.receipt.amount * 10)
    with pytest.raises(ReceiptError, match="amount") as exc:
        check_against(SignedReceipt(x10, P_ID.sign(x10.signing_input())), t)
    assert exc.value.slug == "amount"


def test_wall_time_bounded_by_what_the_consumer_observed():
    from synord.protocols.receipts import Observed
    t = terms(duration_s=3660)
    whole = issue(P_ID, t, cpu_s=0.1, peak_memory=1, started=T0, ended=T0 + 3_660_000)
    check_against(whole, t)  # within the agreed duration: only the observation catches it
    with pytest.raises(ReceiptError, match="observed") as exc:
        countersign(C_ID, whole, t, Observed(T0, T0 + 100))
    assert exc.value.slug == "over_observed"
    # the provider's clock and message delays: a little over what we saw still passes
    near = issue(P_ID, t, cpu_s=0.1, peak_memory=1, started=T0, ended=T0 + 1_500)
    assert verify_receipt(countersign(C_ID, near, t, Observed(T0 + 50, T0 + 100)))
