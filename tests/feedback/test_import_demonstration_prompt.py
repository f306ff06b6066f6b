"""A demonstration prompt must end with a user message (review 17 F11): one ending with an assistant (or system)
message would give an SFT row whose prompt ends with an assistant turn; the import refuses it, naming the line."""
from __future__ import annotations

import json

import pytest

from alignloop.errors import UserError


@pytest.mark.parametrize("last", ["assistant", "system"])
def test_a_demonstration_prompt_ending_with_a_non_user_message_is_refused(store, tmp_path, last):
    p = store.create_project("d", "demonstration")
    bad = {"prompt": [{"role": "user", "content": "hi"}, {"role": last, "content": "yo"}]}
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "fine"}, bad]))
    with pytest.raises(UserError) as e:
        store.import_jsonl(p.id, str(path))
    assert "line 2" in str(e.value) and "must end with a user message" in str(e.value)
    assert f"{last!r}" in str(e.value)
    assert store.project_summary(p.id)["items"] == 0


def test_a_demonstration_prompt_ending_with_a_user_message_is_imported(store):
    p = store.create_project("d", "demonstration")
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    r = store.import_records(p.id, [{"prompt": "plain"}, {"prompt": chat}])
    assert (r.prompts, r.items) == (2, 2)
