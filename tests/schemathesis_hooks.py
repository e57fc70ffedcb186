"""Schemathesis hooks for tests/test_schemathesis.py (loaded through ``SCHEMATHESIS_HOOKS``)."""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.serializer("application/jsonl", "application/x-ndjson")
def jsonl(_: schemathesis.SerializationContext, value: Any) -> bytes:
    """JSON Lines bodies (alignment-set and dataset uploads): one JSON document per line."""
    rows = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)
