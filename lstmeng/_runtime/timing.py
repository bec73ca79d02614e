"""Benchmark timers (being written)."""
