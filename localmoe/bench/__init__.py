"""Benchmarks: question suites and their scoring, runs of models × routing policies with accuracy, joules and
intelligence per watt, and reports a user reads."""
