"""Prefect tasks and the I/O around the library: MLflow tracking, DVC snapshots."""
