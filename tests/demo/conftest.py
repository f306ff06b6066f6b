"""Shared by the demo and pipeline tests."""
from __future__ import annotations

import pytest


def _label_like_people(db: str, project: str, names=("ann", "bob")) -> int:
    """People who like length judge every item of `project` in `db`, through the same store calls the app makes
    (the longer response wins). Returns the number of judgements."""
    from alignloop.feedback.store import Store

    # a seeded display order: with random ones an unbiased labeler is flagged for position bias about 1% of the time
    # (the check's p < 0.01 by design), which made the tests asserting "nobody flagged" fail now and then
    store = Store(db, seed=0)
    p = store.get_project(project)
    judged = 0
    for name in names:
        lab = store.add_labeler(name, "a long password")
        while (a := store.next_assignment(p.id, lab.id)) is not None:
            left, right = (c["text"] for c in store.item_view(a.item, a.shown_order)["completions"])
            choice = "left" if (len(left), left) >= (len(right), right) else "right"
            store.submit(a.id, lab.id, {"choice": choice, "strength": "better"},
                         idempotency_key=f"key-{name}-{a.id:06d}")
            judged += 1
    store.dispose()
    return judged


@pytest.fixture
def label_like_people():
    return _label_like_people
