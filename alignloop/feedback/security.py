"""Passwords (argon2id, memory-hard), the session secret, and CSRF tokens.

The secret key that signs session cookies comes from, in order: `--secret-key`, the `ALIGNLOOP_FEEDBACK_SECRET`
environment variable, or a file `feedback-secret.key` next to the SQLite database (created with mode 0600 on first
use; for a PostgreSQL URL, in the current folder). It is never in the code.
"""
from __future__ import annotations

import functools
import hmac
import os
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.engine import make_url

from alignloop.errors import UserError

_HASHER = PasswordHasher()  # argon2id, RFC 9106 low-memory profile (64 MiB, 3 passes)
SECRET_ENV = "ALIGNLOOP_FEEDBACK_SECRET"


@functools.cache
def _dummy_hash() -> str:
    """A hash to verify against for unknown users (same cost as a real check). Made on first use, not at import:
    it costs a full argon2 run (~0.2 s), which delayed every server start and restart."""
    return _HASHER.hash("dummy password for timing")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    try:
        return _HASHER.verify(stored_hash or _dummy_hash(), password or "") and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def tokens_equal(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


def resolve_secret_key(explicit: str | None, db_url: str) -> str:
    if explicit:
        key = explicit
    elif os.environ.get(SECRET_ENV):
        key = os.environ[SECRET_ENV]
    else:
        url = make_url(db_url)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            path = Path(url.database).resolve().parent / "feedback-secret.key"
        else:
            path = Path.cwd() / "feedback-secret.key"
        if path.exists():
            key = path.read_text().strip()
        else:
            key = new_token(48)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key + "\n")
    if len(key) < 32:
        raise UserError("the secret key must be at least 32 characters")
    return key
