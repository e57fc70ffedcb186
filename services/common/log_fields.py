"""Fields every log producer and reader treats the same way: ids, status and metadata."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, Literal, get_args

# A log's outcome: answered, failed, or reported before its response arrived.
LogStatus = Literal["success", "error", "pending"]
LOG_STATUSES: tuple[str, ...] = get_args(LogStatus)
LOG_STATUS_CHOICES = ", ".join(f"'{status}'" for status in LOG_STATUSES)


def new_log_id(now_ms: int | None = None) -> str:
    """A UUIDv7: unique, and sorting by it sorts by capture time."""
    ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    h = f"{value:032x}"  # str(uuid.UUID(int=value)) without building the UUID
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def stringify(value: Any) -> str | None:
    """Tag values are strings: numbers and booleans are stringified, None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def merge_metadata(*sources: Mapping[str, Any] | None) -> dict[str, str]:
    """Later sources win; numbers and booleans are stringified; nulls are dropped."""
    merged: dict[str, str] = {}
    for source in sources:
        for key, value in (source or {}).items():
            text = stringify(value)
            if text is not None:
                merged[str(key)] = text
    return merged
