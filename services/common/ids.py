"""Resource ids: a short type prefix and 20 random hex digits (``ds_1f…``, ``prj_…``)."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"
