"""The in-memory key ring: keys resolve to their project until revoked on ``catalog.v1``."""

from __future__ import annotations

import pytest

from services.common.auth import API_KEY_KIND, KeyRing, generate_api_key, hash_api_key, resolve_project
from services.common.errors import APIError
from services.common.events import CatalogRecord


def key_record(key: str, project_id: str) -> CatalogRecord:
    return CatalogRecord(kind=API_KEY_KIND, id=hash_api_key(key), data={"project_id": project_id})


def test_a_key_resolves_until_it_is_revoked_even_after_being_used() -> None:
    keyring, key, other = KeyRing(), generate_api_key(), generate_api_key()
    keyring.apply(key_record(key, "proj_a"))
    keyring.apply(key_record(other, "proj_b"))
    for _ in range(3):  # repeated requests with the same key
        assert resolve_project(keyring, f"Bearer {key}") == "proj_a"
    assert resolve_project(keyring, f"Bearer {other}") == "proj_b"
    keyring.apply(CatalogRecord(kind=API_KEY_KIND, id=hash_api_key(key), deleted=True))
    with pytest.raises(APIError) as refused:
        resolve_project(keyring, f"Bearer {key}")
    assert refused.value.status_code == 401
    assert resolve_project(keyring, f"Bearer {other}") == "proj_b"
    assert keyring.knows_project("proj_a")  # revoking a key does not make its project unknown


def test_an_unknown_key_stays_unknown_until_it_is_added() -> None:
    keyring, key = KeyRing(), generate_api_key()
    for _ in range(2):
        assert keyring.project_for(key) is None
    keyring.apply(key_record(key, "proj_a"))
    assert keyring.project_for(key) == "proj_a"
