"""`DataError` (a bad row or a bad file) and `DataStats` (what a load or tokenisation pass did)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from alignloop.errors import UserError

log = logging.getLogger("alignloop.data")


class DataError(UserError):
    """A bad data file or row. The message names the file, the line (1-based, JSONL/CSV) or index (JSON, Parquet,
    HF datasets), the field, and what was expected, e.g.
    ``pairs.jsonl line 7, field 'chosen': expected a string or a list of messages, got null``."""


@dataclass
class DataStats:
    """Counts from reading, parsing and tokenising.

    rows: rows read from the source (bad ones included); bad_rows: rows skipped as bad (only with skip_bad_rows);
    errors: the messages of the bad rows (first 100); kind: the detected/asked format; records: records produced
    (groups for preference data); pairs: preference pairs produced; ties_skipped: tied ranking pairs left out;
    truncated: examples (SFT), pairs (tokenize_preferences) or groups (tokenize_rankings) shortened to max_length;
    dropped: those removed by the truncation policy (too long with "drop", or nothing left to train on)."""
    kind: str | None = None
    rows: int = 0
    bad_rows: int = 0
    errors: list[str] = field(default_factory=list)
    records: int = 0
    pairs: int = 0
    ties_skipped: int = 0
    truncated: int = 0
    dropped: int = 0

    def add_error(self, message: str) -> None:
        self.bad_rows += 1
        if len(self.errors) < 100:
            self.errors.append(message)

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in vars(self).items() if k != "errors" and v not in (None, 0)]
        return "data: " + ", ".join(parts)


def raise_or_skip(stats: DataStats, skip_bad_rows: bool) -> None:
    """After a pass that collected bad rows in `stats`: raise the first as a DataError unless skipping (then log)."""
    if not stats.bad_rows:
        return
    if not skip_bad_rows:
        more = f" ({stats.bad_rows} bad rows in all; pass skip_bad_rows=True / --skip-bad-rows to skip them)"
        raise DataError(stats.errors[0] + more)
    log.warning("skipped %d bad rows; first: %s", stats.bad_rows, stats.errors[0])
