"""Benchmarks: each module prints one JSON object (targets live here, not in timed tests)."""
