"""API keys: minted once, stored only as a hash, resolved to a project on every request."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from fastapi import Request

from services.common.errors import unauthorized
from services.common.events import CatalogRecord

API_KEY_PREFIX = "opk_"
API_KEY_KIND = "api_key"


def generate_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """Keys are 256-bit random, so a plain SHA-256 is enough (no password-style stretching)."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """In-memory map of key hash → project id, kept current from ``catalog.v1``."""

    def __init__(self) -> None:
        self._projects_by_hash: dict[str, str] = {}
        # Keys seen in requests that resolved, so a busy client's key is hashed once, not on every
        # request (~2 % of /report's CPU). Only valid keys enter; any key record empties it.
        self._projects_by_key: dict[str, str] = {}
        # Every project that has ever had a key: revoking a key does not make its project unknown.
        self._projects: set[str] = set()

    def apply(self, record: CatalogRecord) -> None:
        if record.kind != API_KEY_KIND:
            return
        if record.deleted:
            self._projects_by_hash.pop(record.id, None)
            self._projects_by_key.clear()
        else:
            self.add(record.id, str(record.data["project_id"]))

    def add(self, key_hash: str, project_id: str) -> None:
        self._projects_by_key.clear()
        self._projects_by_hash[key_hash] = project_id
        self._projects.add(project_id)

    def knows_project(self, project_id: str) -> bool:
        """Whether ``project_id`` names a project of this install (one that has had a key)."""
        return project_id in self._projects

    def project_for(self, api_key: str) -> str | None:
        project_id = self._projects_by_key.get(api_key)
        if project_id is None:
            project_id = self._projects_by_hash.get(hash_api_key(api_key))
            if project_id is not None:
                self._projects_by_key[api_key] = project_id
        return project_id

    def __len__(self) -> int:
        return len(self._projects_by_hash)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def resolve_project(keyring: KeyRing, authorization: str | None) -> str:
    """The project owning the bearer key; a 401 that never echoes the key otherwise."""
    token = bearer_token(authorization)
    if token is None:
        raise unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    project_id = keyring.project_for(token)
    if project_id is None:
        raise unauthorized("Invalid API key.")
    return project_id


async def require_project(request: Request) -> str:
    """FastAPI dependency: the caller's project id."""
    return resolve_project(request.app.state.keyring, request.headers.get("authorization"))


# --- gRPC callers ---------------------------------------------------------------------------------

INTERNAL_TOKEN_HEADER = "x-distillery-internal-token"
PROJECT_HEADER = "x-distillery-project"


def grpc_metadata(metadata: Iterable[tuple[str, str | bytes]] | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key.lower() == name:
            return value if isinstance(value, str) else None
    return None


def resolve_grpc_project(
    keyring: KeyRing, metadata: Iterable[tuple[str, str | bytes]] | None, internal_token: str | None
) -> str:
    """The project a gRPC call acts for.

    Clients send their project key (``authorization: Bearer <key>``). Distillery's own
    services (which hold no project keys) send the install's internal token and name the
    project (``x-distillery-internal-token`` + ``x-distillery-project``). Errors never echo
    either secret.
    """
    metadata = list(metadata or ())
    token = grpc_metadata(metadata, INTERNAL_TOKEN_HEADER)
    if token is None:
        return resolve_project(keyring, grpc_metadata(metadata, "authorization"))
    project_id = (grpc_metadata(metadata, PROJECT_HEADER) or "").strip()
    if (
        not internal_token
        or not project_id
        or not hmac.compare_digest(token.encode(), internal_token.encode())
    ):
        raise unauthorized("Invalid internal credentials.")
    return project_id
