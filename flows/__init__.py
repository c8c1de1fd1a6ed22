"""Prefect flows: the scheduled learning pipeline, rollback, and the forgetting experiment."""
