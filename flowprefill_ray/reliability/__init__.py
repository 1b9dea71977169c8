"""Reliability tooling: steady open-loop load against a running engine with resource sampling
(used by benchmarks/soak.py and the overload test). See docs/RELIABILITY.md."""
