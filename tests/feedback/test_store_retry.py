"""Deadlock victims are run again: PostgreSQL aborts one of two transactions that lock items in crossed order
(40P01) and the store retries it; any other database error is raised at once."""
import pytest
from sqlalchemy.exc import OperationalError

from alignloop.feedback import store


class _Orig(Exception):
    def __init__(self, sqlstate):
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def _flaky(fail_times, sqlstate):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= fail_times:
            raise OperationalError("UPDATE items ...", {}, _Orig(sqlstate))
        return "stored"
    return fn, calls


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
def test_deadlock_and_serialization_failures_are_retried(sqlstate):
    fn, calls = _flaky(2, sqlstate)
    assert store._retrying(fn) == "stored"
    assert len(calls) == 3


def test_other_operational_errors_are_not_retried():
    fn, calls = _flaky(1, "08006")  # connection failure: not safe to assume the transaction was rolled back
    with pytest.raises(OperationalError):
        store._retrying(fn)
    assert len(calls) == 1


def test_a_deadlock_every_time_gives_up_after_the_retries():
    fn, calls = _flaky(100, "40P01")
    with pytest.raises(OperationalError):
        store._retrying(fn)
    assert len(calls) == store._RETRIES
