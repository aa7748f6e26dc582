"""Performance benchmarks of the SAGE suite (run `python -m benchmarks.bench --help`)."""
