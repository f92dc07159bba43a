"""Crash recovery for the key-value store (partitioning, recovery segments, replay)."""
