"""Flower app that trains small models with FedAvg and secure aggregation."""
