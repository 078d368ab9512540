"""Benchmarks and attack evaluations for fedsec_flwr."""
