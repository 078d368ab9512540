"""Secure aggregation, differential privacy and verification for Flower."""
