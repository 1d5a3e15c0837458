"""Benchmark scripts that print the figures quoted in the README and issue notes."""
