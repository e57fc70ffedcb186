"""Provider secrets at rest (Postgres) and in flight (``catalog.v1``): AES-256-GCM.

A sealed secret is ``v1.<base64url nonce>.<base64url ciphertext+tag>`` (unpadded base64url, a
fresh 96-bit nonce per call). Only ``api`` seals; hot-path services (the router) open what they
read from ``catalog.v1`` with the same key, so every process of one deployment must share it:
set ``DISTILLERY_SECRET_KEY`` (base64 of 32 random bytes), or let the processes share
``data_dir`` where the key is created on first start (``<data_dir>/secret.key``, mode 0600).

No error raised here ever contains a plaintext secret or the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from services.common.settings import Settings

log = logging.getLogger(__name__)

VERSION = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_FILE = "secret.key"
# Binds every ciphertext to this format version: a token cannot be replayed under another scheme.
_AAD = b"distillery.secret.v1"
_GENERATE_HINT = 'python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"'


class SecretError(ValueError):
    """A sealed secret that cannot be opened: malformed, tampered with, or sealed under another key."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _cipher(key: bytes) -> AESGCM:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"the secret key must be exactly {KEY_BYTES} bytes")
    return AESGCM(key)


def encrypt_secret(plaintext: str, key: bytes) -> str:
    """Seal ``plaintext``; two calls on the same input give different tokens."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = _cipher(key).encrypt(nonce, plaintext.encode("utf-8"), _AAD)
    return f"{VERSION}.{_b64encode(nonce)}.{_b64encode(sealed)}"


def decrypt_secret(token: str, key: bytes) -> str:
    """Open a token made by :func:`encrypt_secret`; :class:`SecretError` if it cannot be."""
    cipher = _cipher(key)
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != VERSION:
        raise SecretError(f"not a sealed secret: expected '{VERSION}.<nonce>.<ciphertext>'")
    try:
        nonce, sealed = _b64decode(parts[1]), _b64decode(parts[2])
    except (binascii.Error, ValueError):
        raise SecretError("not a sealed secret: invalid base64url") from None
    if len(nonce) != NONCE_BYTES:
        raise SecretError("not a sealed secret: bad nonce length")
    try:
        plain = cipher.decrypt(nonce, sealed, _AAD)
    except InvalidTag:
        raise SecretError("cannot decrypt secret: wrong key or tampered ciphertext") from None
    return plain.decode("utf-8")


def parse_key(encoded: str, *, source: str) -> bytes:
    """Base64 (standard or url-safe, padded or not) of exactly 32 bytes; the error never shows it."""
    text = encoded.strip()
    try:
        raw = base64.b64decode(
            text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True
        )
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ValueError(
            f"{source} must be the base64 encoding of exactly {KEY_BYTES} random bytes; "
            f"generate one with: {_GENERATE_HINT}"
        )
    return raw


def load_or_create_key(settings: Settings) -> bytes:
    """The deployment's secret key: ``DISTILLERY_SECRET_KEY`` if set, else ``<data_dir>/secret.key``.

    The file is created (mode 0600) on first use; concurrent first starts agree on one key.
    """
    if settings.secret_key is not None:
        return parse_key(settings.secret_key.get_secret_value(), source="DISTILLERY_SECRET_KEY")
    path = Path(settings.data_dir) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path)
    key = os.urandom(KEY_BYTES)
    with os.fdopen(fd, "w") as file:
        file.write(base64.b64encode(key).decode("ascii") + "\n")
        file.flush()
        os.fsync(file.fileno())
    log.info("created a new secret key at %s; back it up (provider secrets cannot be read without it)", path)
    return key


def internal_token(settings: Settings) -> str:
    """The service-to-service credential: ``DISTILLERY_INTERNAL_TOKEN`` if set, else derived from the
    secret key (HMAC-SHA256 of ``"internal-token"``), so processes sharing the key share the token."""
    if settings.internal_token is not None and settings.internal_token.get_secret_value().strip():
        return settings.internal_token.get_secret_value().strip()
    return hmac.new(load_or_create_key(settings), b"internal-token", hashlib.sha256).hexdigest()


def _read_key_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
    text = ""
    for _ in range(50):  # another process may be between creating and writing it
        text = path.read_text(encoding="ascii", errors="replace").strip()
        if text:
            break
        time.sleep(0.02)
    return parse_key(text, source=f"the key file {path}")
