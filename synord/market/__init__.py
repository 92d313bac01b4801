"""The market: order book share, matching, router score, pricing,
reservations, the two negotiating parties and the ledger."""
