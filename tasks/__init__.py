"""Prefect tasks: thin wrappers over cl_core.pipeline, one file per pipeline stage."""
