"""What the feedback store raises for a request it refuses (all `UserError`s: the CLI prints them, the web app maps
NotFound to 404, Forbidden to 403 and ValidationError to 422 with a message per field)."""
from __future__ import annotations

from alignloop.errors import UserError


class ValidationError(UserError):
    """A submitted form is invalid; `errors` maps field -> message."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))


class NotFound(UserError):
    """No such project / assignment, or not the caller's (a labeler never learns whether another's exists)."""


class Forbidden(UserError):
    """The thing exists but belongs to someone else (e.g. another labeler's idempotency key)."""


class DatabaseBusy(UserError):
    """The database's write lock stayed taken longer than the store's lock timeout (`Store(lock_timeout_s=)`: a
    writer in another process, ...). The web app answers 503 with Retry-After; trying again shortly is safe."""


class WouldBlock(DatabaseBusy):
    """Raised instead of waiting for the write lock while `db.no_wait()` is on (database work on the event loop):
    nothing was written; the caller runs the work again in a worker thread, where waiting is harmless."""
