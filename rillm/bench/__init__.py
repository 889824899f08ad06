"""Benchmarks that ship with rillm (`rillm bench serve`)."""
