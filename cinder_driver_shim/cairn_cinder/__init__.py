"""Cairn's Cinder volume driver shim: an RBD driver whose replication goes
through cairnd (see docs/CINDER.md)."""
