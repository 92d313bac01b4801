"""Attacks on real daemons through the wire (see hostile.py)."""
