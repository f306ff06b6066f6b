"""The constitution file: parsing, the default, the prompts it renders, and clear errors naming file and field."""
import random

import pytest
import yaml

from alignloop.ai_feedback import DEFAULT_CONSTITUTION, load_constitution, parse_constitution
from alignloop.errors import ConfigError

GOOD = {"name": "reviews", "comparison": "Which review is better?",
        "principles": [{"name": "positive", "critique": "Point out the negative remarks.",
                        "revision": "Rewrite the review positively.", "comparison": "Which review is kinder?"},
                       {"name": "short", "critique": "Is it too long?", "revision": "Make it shorter."}]}


def test_default_is_valid_and_has_several_principles():
    c = load_constitution()
    assert c.name == DEFAULT_CONSTITUTION["name"]
    assert len(c.principles) >= 4
    assert c.answers == (" (A)", " (B)")
    assert all(p.critique and p.revision and p.comparison for p in c.principles)
    assert load_constitution("default") == c


def test_yaml_file_round_trip_and_default_question(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(GOOD))
    c = load_constitution(f)
    assert [p.name for p in c.principles] == ["positive", "short"]
    assert c.principle("positive").comparison == "Which review is kinder?"
    assert c.principle("short").comparison == "Which review is better?"   # the top-level question fills in
    # a seeded draw is reproducible and reaches every principle
    draws = [c.sample(random.Random(s)).name for s in range(40)]
    assert draws == [c.sample(random.Random(s)).name for s in range(40)]
    assert set(draws) == {"positive", "short"}


def test_plain_text_prompts_render_the_templates():
    c = parse_constitution({**GOOD, "templates": {"comparison": "{prompt} | {question} | A: {first} | B: {second}",
                                                  "answer_prefix": "Answer:"}}, "x")
    p = c.principle("positive")
    assert c.comparison_prompt("Review of X:", "good .", "bad .", p) == \
        "Review of X: | Which review is kinder? | A: good . | B: bad .\nAnswer:"
    assert c.reasoning_prompt("Q", "1", "2", p) == \
        "Q | Which review is kinder? | A: 1 | B: 2\nLet's think step by step:"
    assert c.comparison_prompt("Q", "1", "2", p, reasoning=" 1 is kinder .") == \
        "Q | Which review is kinder? | A: 1 | B: 2\nLet's think step by step: 1 is kinder .\nAnswer:"
    assert c.critique_prompt("Q:", " r", p) == "Q: r\n\nCritique request: Point out the negative remarks.\n\nCritique:"
    assert c.revision_prompt("Q:", " r", " bad", p).endswith(
        "Critique: bad\n\nRevision request: Rewrite the review positively.\n\nRevision:")


class ChatTok:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_chat_models_see_conversations():
    c = parse_constitution(GOOD, "x")
    p = c.principle("positive")
    assert c.critique_prompt("hi", "yo", p, ChatTok()) == \
        "<user>hi<assistant>yo<user>Point out the negative remarks.<assistant>"
    assert c.revision_prompt("hi", "yo", "rude", p, ChatTok()) == (
        "<user>hi<assistant>yo<user>Point out the negative remarks.<assistant>rude<user>Rewrite the review "
        "positively.<assistant>")
    text = c.comparison_prompt("hi", "one", "two", p, ChatTok())
    assert text.startswith("<user>Consider the following conversation") and text.endswith("<assistant>The answer is:")
    assert "(A) one\n(B) two" in text


@pytest.mark.parametrize("bad, message", [
    ({}, "principles must be a non-empty list"),
    ({"principles": []}, "principles must be a non-empty list"),
    ({"principles": ["be nice"]}, "principles[0]: expected a mapping"),
    ({"principles": [{"name": "a", "revision": "r", "comparison": "q"}]}, "principles[0]: 'critique' is required"),
    ({"principles": [{"name": "a", "critique": "c", "revision": "r"}]}, "'comparison' is required"),
    ({"principles": [{"name": "a", "critique": "c", "revision": "r", "comparison": "q", "weight": 2}]},
     "principles[0]: unknown field(s) weight"),
    ({**GOOD, "principles": GOOD["principles"] + [GOOD["principles"][0]]}, "duplicate principle name 'positive'"),
    ({**GOOD, "answers": [" (A)"]}, "answers must be two different non-empty strings"),
    ({**GOOD, "answers": ["A", "A"]}, "answers must be two different"),
    ({**GOOD, "templates": {"comparison": "{prompt} {first}"}}, "templates.comparison: must contain {second}"),
    ({**GOOD, "templates": {"critique": "{response} {request} {oops}"}},
     "templates.critique: unknown placeholder(s) {oops}"),
    ({**GOOD, "templates": {"critique": "{response {request}"}}, "templates.critique: not a valid template"),
    ({**GOOD, "templates": {"verdict": "x"}}, "templates: unknown field(s) verdict"),
    ({**GOOD, "rules": []}, "unknown field(s) rules"),
])
def test_errors_name_the_file_and_field(tmp_path, bad, message):
    f = tmp_path / "const.yaml"
    f.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as e:
        load_constitution(f)
    assert str(f) in str(e.value) and message in str(e.value)


def test_missing_file_and_unknown_principle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_constitution(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="no principle named 'kind'"):
        load_constitution().principle("kind")
