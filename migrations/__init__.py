"""Alembic migrations of the eventstore schema (append-only: never edit a merged revision)."""
