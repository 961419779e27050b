"""Load tests and the benchmark. Not part of the service."""
