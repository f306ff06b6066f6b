"""Passwords (argon2id, memory-hard) and their rules, the session secret, and CSRF tokens.

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
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.engine import make_url

from alignloop.errors import UserError

_HASHER = PasswordHasher()  # argon2id, RFC 9106 low-memory profile (64 MiB, 3 passes)
SECRET_ENV = "ALIGNLOOP_FEEDBACK_SECRET"
MIN_PASSWORD_CHARS = 8
# The most common passwords of 8 or more characters (shorter ones fail the length rule anyway), from the public
# breach top lists; compared case-insensitively, surrounding spaces ignored.
COMMON_PASSWORDS = frozenset("""
password password1 password12 password123 password1234 passw0rd p@ssw0rd p@ssword 12345678 123456789 1234567890
12345678910 0123456789 87654321 11111111 00000000 88888888 123123123 1q2w3e4r 1q2w3e4r5t qwertyui qwertyuiop
qwerty123 qwerty12 1qaz2wsx zaq12wsx asdfghjk asdfghjkl abcd1234 abc12345 abcdefgh iloveyou iloveyou1 sunshine
princess football baseball basketball superman batman123 starwars trustno1 welcome1 welcome123 letmein1
letmein123 changeme changeme1 admin123 administrator computer internet whatever michelle jennifer 123qweasd
qweasdzxc monkey123 dragon123 master123 aa123456 secret123 hello123 freedom1 shadow12 charlie1 default1
""".split())


@functools.cache
def _dummy_hash() -> str:
    """A hash to verify against for unknown users (same cost as a real check). Made on first use, not at import:
    it costs a full argon2 run (~0.2 s), which delayed every server start and restart."""
    return _HASHER.hash("dummy password for timing")


def is_utf8_text(s: str) -> bool:
    """Whether `s` encodes as UTF-8 (no lone surrogates such as the JSON escape "\\ud800")."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def password_problem(password: Any, username: str = "") -> str | None:
    """What is wrong with `password` as a new password for `username` (a message naming the rule), or None. The one
    rule set of the store, the CLI and the admin pages: at least MIN_PASSWORD_CHARS characters not counting
    surrounding spaces ("a" + 7 spaces is too short), not the username (case and surrounding spaces ignored), not one
    of COMMON_PASSWORDS, and text that encodes as UTF-8 (no lone surrogates)."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        return f"password: at least {MIN_PASSWORD_CHARS} characters"
    if not password.strip():
        return "password: must not be only spaces"
    if len(password.strip()) < MIN_PASSWORD_CHARS:
        return f"password: at least {MIN_PASSWORD_CHARS} characters (surrounding spaces not counted)"
    if not is_utf8_text(password):
        return "password: contains a character that is not valid text (a lone surrogate)"
    folded = password.strip().casefold()
    if username and folded == username.strip().casefold():
        return "password: must not be the username"
    if folded in COMMON_PASSWORDS:
        return "password: too common (it is on the list of the most used passwords); choose another"
    return None


def check_new_password(password: Any, username: str = "") -> str:
    """`password` if it passes `password_problem`, else UserError with the rule's message."""
    problem = password_problem(password, username)
    if problem:
        raise UserError(problem)
    return password


def verify_password(stored_hash: str | None, password: str) -> bool:
    try:
        return _HASHER.verify(stored_hash or _dummy_hash(), password or "") and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def tokens_equal(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens as UTF-8 bytes (`hmac.compare_digest` refuses str with non-ASCII
    characters with a TypeError, which was a 500 on any POST; lone surrogates pass through 'surrogatepass')."""
    if not a or not b:
        return False
    return hmac.compare_digest(str(a).encode("utf-8", "surrogatepass"), str(b).encode("utf-8", "surrogatepass"))


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
