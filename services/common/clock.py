"""The one notion of "now" for stored timestamps, and how they are written on the wire."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)


def iso_z(moment: datetime | None) -> str | None:
    """``iso`` with a ``Z`` for UTC (the evals API's format); None stays None."""
    return None if moment is None else iso(moment).replace("+00:00", "Z")


def iso(moment: datetime) -> str:
    # SQLite hands back naive datetimes; every stored one is UTC.
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()
