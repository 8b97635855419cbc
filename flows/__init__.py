"""Prefect flows and the `copal` command line.

A process that runs these flows calls `flows.api.prefect_settings()` once, before
Prefect is imported (the command line's `main` does; so does the test session), and
`copal.allocator.limit_allocator_fragmentation()` if it prunes: process-wide settings
belong to the entry point, not to an import."""
