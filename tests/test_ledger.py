"""Ledger: receipts persisted in SQLite, balance, reputation from outcomes."""

import dataclasses
import os
import sqlite3

import pytest

from synord.protocols.receipts import ReceiptError, countersign, issue
from synord.market.ledger import Ledger, init_schema

from test_negotiation import C_ID, P_ID, T0, X_ID, terms


def receipt(outcome="completed", price=1.5, seconds=3600, **kw):
    t = terms(aid=os.urandom(16), price=price, duration_s=7200, **kw)
    sr = issue(P_ID, t, cpu_s=10, peak_memory=1 << 20, started=T0, ended=T0 + seconds * 1000, outcome=outcome)
    return countersign(C_ID, sr, t)


def test_balance_on_both_sides_and_persistence(tmp_path):
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    init_schema(conn)
    init_schema(conn)  # idempotent (called from the store's migrations)
    prov, cons = Ledger(conn, P_ID.peer_id), Ledger(sqlite3.connect(tmp_path / "c.db"), C_ID.peer_id)
    r1, r2 = receipt(price=1.5), receipt(price=0.5, seconds=1800)
    for r in (r1, r2):
        assert prov.record(r) and cons.record(r)
    assert not prov.record(r1)  # stored once
    assert prov.balance() == pytest.approx(1.5 * 2 + 0.5 * 2 * 0.5)
    assert cons.balance() == pytest.approx(-prov.balance())
    conn.close()
    again = Ledger(sqlite3.connect(db), P_ID.peer_id)
    doc = again.to_json()
    assert doc["balance"] == pytest.approx(3.5) and len(doc["receipts"]) == 2
    assert doc["receipts"][0]["role"] == "provider" and len(doc["receipts"][0]["consumer_sig"]) == 128


def test_unsigned_tampered_or_foreign_receipts_refused():
    led = Ledger(sqlite3.connect(":memory:"), P_ID.peer_id)
    good = receipt()
    with pytest.raises(ReceiptError, match="signatures"):
        led.record(dataclasses.replace(good, csig=None))
    with pytest.raises(ReceiptError, match="signatures"):
        led.record(dataclasses.replace(good, receipt=dataclasses.replace(good.receipt, amount=1e6)))
    with pytest.raises(ReceiptError, match="neither party"):
        Ledger(sqlite3.connect(":memory:"), X_ID.peer_id).record(good)
    assert led.balance() == 0.0


def test_reputation_from_completed_vs_failed_and_abandoned():
    led = Ledger(sqlite3.connect(":memory:"), C_ID.peer_id)
    assert led.reputation(P_ID.peer_id) == 0.5  # unknown: neutral prior
    for _ in range(8):
        led.record(receipt())
    assert led.reputation(P_ID.peer_id) == pytest.approx(9 / 10)
    led.record(receipt(outcome="failed"))
    led.record_outcome(os.urandom(16), P_ID.peer_id, "abandoned", T0)  # vanished mid-lease, no receipt
    led.record(receipt(outcome="cancelled"))  # neither good nor bad
    assert led.counts(P_ID.peer_id) == (8, 2)
    assert led.reputation(P_ID.peer_id) == pytest.approx(9 / 12)
    # a signed receipt supersedes a local observation, never the other way round
    r = receipt()
    led.record_outcome(r.receipt.aid, P_ID.peer_id, "abandoned", T0)
    led.record(r)
    led.record_outcome(r.receipt.aid, P_ID.peer_id, "abandoned", T0 + 1)
    assert led.counts(P_ID.peer_id) == (9, 2)
