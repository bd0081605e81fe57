"""Benchmarks that regenerate the tables in benchmarks/results/ (each has a make target)."""
