"""Prefect flows and the `copal` command line."""
