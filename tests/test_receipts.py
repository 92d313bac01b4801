"""Usage receipts: issue (provider), countersign (consumer), verify, tampering refused."""

import dataclasses

import pytest

from protocols.envelope import decode, seal
from protocols.receipts import (
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
