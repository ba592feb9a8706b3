"""Thin adapters between the green-mlops core and host frameworks (MLflow, Lightning)."""
