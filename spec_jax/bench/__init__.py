"""Benchmarks: packaged prompt sets, workers that time one method each, reports."""
