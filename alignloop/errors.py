"""User-facing errors. The CLI prints these without a traceback and exits with status 2."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (a file, a flag, a config field), with a message that says what to fix."""


class ConfigError(UserError):
    """A bad configuration value: names the field and what was expected."""
