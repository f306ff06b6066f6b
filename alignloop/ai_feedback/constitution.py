"""A constitution (Bai et al. 2022): written principles, each with a critique request, a revision request and a
comparison question, plus the prompt templates a model without a chat template sees.

    c = load_constitution("constitution.yaml")     # None / "default": the built-in one (DEFAULT_CONSTITUTION)
    p = c.sample(random.Random(0))                  # a principle drawn at random (CAI draws one per critique)
    text = c.comparison_prompt(prompt, first, second, p, tokenizer)   # what the judge scores the answers after

The file (YAML):

    name: helpful-harmless
    comparison: Which of these responses is better?     # the question of principles that give none
    answers: [" (A)", " (B)"]                             # the continuations whose log-probabilities are compared
    templates:                                            # optional; plain-text models only (chat models: below)
      critique: "{prompt}{response}\\n\\nCritique request: {request}\\n\\nCritique:"
      revision: "...Critique:{critique}...Revision request: {request}\\n\\nRevision:"
      comparison: "...{prompt}...{question}...(A) {first}...(B) {second}"
      answer_prefix: "The answer is:"
      cot_prefix: "Let's think step by step:"
    principles:
      - name: harmless
        critique: Identify specific ways in which the response is harmful ...
        revision: Please rewrite the response to remove ...
        comparison: Which of these responses is less harmful? ...

A model with a chat template sees conversations instead: critique = [user: prompt, assistant: response, user:
critique request], revision = the same plus [assistant: critique, user: revision request], comparison = [user: the
rendered comparison template] followed by the answer prefix (and, with chain-of-thought, the CoT prefix, the
model's reasoning, then the answer prefix).
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass, field, fields
from pathlib import Path

from alignloop.errors import ConfigError
from alignloop.training.config import read_yaml

PLACEHOLDERS = {  # template -> the placeholders it must contain (and may contain: no others)
    "critique": ({"response", "request"}, {"prompt", "response", "request"}),
    "revision": ({"response", "critique", "request"}, {"prompt", "response", "critique", "critique_request",
                                                       "request"}),
    "comparison": ({"first", "second"}, {"prompt", "question", "first", "second"}),
    "answer_prefix": (set(), set()),
    "cot_prefix": (set(), set()),
}


@dataclass(frozen=True)
class Templates:
    """Prompt templates (str.format placeholders in braces) for models without a chat template; `comparison` is
    also the user message a chat model is shown. Generated text goes in verbatim right after the prompt it
    continued ("Critique:{critique}": a generated critique keeps its leading space), so a revision prompt reads
    exactly as the model's own critique did."""
    critique: str = "{prompt}{response}\n\nCritique request: {request}\n\nCritique:"
    revision: str = ("{prompt}{response}\n\nCritique request: {critique_request}\n\nCritique:{critique}\n\n"
                     "Revision request: {request}\n\nRevision:")
    comparison: str = ("Consider the following conversation between a human and an assistant:\n\n"
                       "Human: {prompt}\n\n{question}\n\nOptions:\n(A) {first}\n(B) {second}")
    answer_prefix: str = "The answer is:"
    cot_prefix: str = "Let's think step by step:"


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str     # the critique request
    revision: str     # the revision request
    comparison: str   # the multiple-choice question the judge answers


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    name: str = "custom"
    answers: tuple[str, str] = (" (A)", " (B)")
    templates: Templates = field(default_factory=Templates)

    def sample(self, rng: random.Random) -> Principle:
        return self.principles[rng.randrange(len(self.principles))]

    def principle(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        raise ConfigError(f"constitution {self.name!r}: no principle named {name!r}; it has "
                          f"{', '.join(p.name for p in self.principles)}")

    # ------------------------------------------------------------------------------------ prompts a model sees
    def critique_prompt(self, prompt: str, response: str, principle: Principle, tokenizer=None) -> str:
        if _chat(tokenizer):
            return _render(tokenizer, [("user", prompt), ("assistant", response), ("user", principle.critique)])
        return self.templates.critique.format(prompt=prompt, response=response, request=principle.critique)

    def revision_prompt(self, prompt: str, response: str, critique: str, principle: Principle,
                        tokenizer=None) -> str:
        if _chat(tokenizer):
            return _render(tokenizer, [("user", prompt), ("assistant", response), ("user", principle.critique),
                                       ("assistant", critique), ("user", principle.revision)])
        return self.templates.revision.format(prompt=prompt, response=response, critique=critique,
                                              critique_request=principle.critique, request=principle.revision)

    def comparison_prompt(self, prompt: str, first: str, second: str, principle: Principle, tokenizer=None,
                          reasoning: str | None = None) -> str:
        """The text after which the judge's answer options are scored; with `reasoning` (the judge's chain of
        thought, continuing `reasoning_prompt`), the answer prefix follows it."""
        if reasoning is None:
            return self._comparison_head(prompt, first, second, principle, tokenizer) + self.templates.answer_prefix
        return f"{self.reasoning_prompt(prompt, first, second, principle, tokenizer)}{reasoning}\n" \
               f"{self.templates.answer_prefix}"

    def reasoning_prompt(self, prompt: str, first: str, second: str, principle: Principle, tokenizer=None) -> str:
        """The comparison followed by the chain-of-thought prefix, for the judge to continue."""
        return self._comparison_head(prompt, first, second, principle, tokenizer) + self.templates.cot_prefix

    def _comparison_head(self, prompt: str, first: str, second: str, principle: Principle, tokenizer) -> str:
        body = self.templates.comparison.format(prompt=prompt, question=principle.comparison, first=first,
                                                second=second)
        return _render(tokenizer, [("user", body)]) if _chat(tokenizer) else body + "\n"


def _chat(tokenizer) -> bool:
    return tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None


def _render(tokenizer, turns: list[tuple[str, str]]) -> str:
    messages = [{"role": r, "content": c} for r, c in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------ the default
# Adapted from the critique/revision requests and comparison principles of Bai et al. 2022 (Appendix C).
_HARM = "harmful, unethical, racist, sexist, toxic, dangerous, or illegal"
DEFAULT_CONSTITUTION = {
    "name": "helpful-honest-harmless",
    "comparison": "Which of these assistant responses is more helpful, honest and harmless?",
    "principles": [
        {"name": "harmless",
         "critique": f"Identify specific ways in which the assistant's last response is {_HARM}.",
         "revision": f"Please rewrite the assistant response to remove any and all {_HARM} content.",
         "comparison": "Which of these assistant responses is less harmful? Choose the response that a wise, "
                       "ethical, polite and friendly person would more likely say."},
        {"name": "helpful",
         "critique": "Explain ways in which the assistant's last response fails to answer the human's request "
                     "fully, accurately and to the point.",
         "revision": "Please rewrite the assistant response so that it answers the request fully, accurately and "
                     "to the point.",
         "comparison": "Which of these assistant responses answers the human's request more helpfully?"},
        {"name": "honest",
         "critique": "Identify any claims in the assistant's last response that are false, misleading or stated "
                     "with more confidence than is warranted.",
         "revision": "Please rewrite the assistant response so that every claim is true and its uncertainty is "
                     "stated plainly.",
         "comparison": "Which of these assistant responses is more honest and accurate?"},
        {"name": "respectful",
         "critique": "Discuss whether the assistant's last response is rude, condescending or insensitive to the "
                     "human.",
         "revision": "Please rewrite the assistant response to be respectful, considerate and kind.",
         "comparison": "Which of these assistant responses is more respectful and considerate?"},
        {"name": "not_preachy",
         "critique": "Point out where the assistant's last response is preachy, evasive or lectures the human "
                     "instead of helping.",
         "revision": "Please rewrite the assistant response to help directly, without lecturing or evading.",
         "comparison": "Which of these assistant responses helps more directly, without being preachy or evasive?"},
        {"name": "safe_advice",
         "critique": "Identify any advice in the assistant's last response that could lead someone to hurt "
                     "themselves or others.",
         "revision": "Please rewrite the assistant response so that its advice is safe, and say so where a "
                     "professional should be consulted.",
         "comparison": "Which of these assistant responses gives safer advice?"},
    ],
}


# ------------------------------------------------------------------------------------------------ reading
def load_constitution(source: str | Path | dict | Constitution | None = None) -> Constitution:
    """A constitution from a YAML file, a mapping, or None / "default" (the built-in one). Errors name the file and
    the field."""
    if isinstance(source, Constitution):
        return source
    if source is None or source == "default":
        return parse_constitution(DEFAULT_CONSTITUTION, "the default constitution")
    if isinstance(source, dict):
        return parse_constitution(source, "constitution")
    return parse_constitution(read_yaml(source), str(source))


def parse_constitution(d: dict, where: str) -> Constitution:
    _known(d, {"name", "comparison", "answers", "templates", "principles"}, where)
    default_q = d.get("comparison")
    if default_q is not None and not _text(default_q):
        raise ConfigError(f"{where}: comparison must be a non-empty string (the default comparison question)")
    principles = d.get("principles")
    if not isinstance(principles, list) or not principles:
        raise ConfigError(f"{where}: principles must be a non-empty list of {{name, critique, revision, "
                          f"comparison}} mappings")
    parsed, seen = [], set()
    for i, p in enumerate(principles):
        at = f"{where}: principles[{i}]"
        if not isinstance(p, dict):
            raise ConfigError(f"{at}: expected a mapping with name, critique, revision (and comparison), got "
                              f"{type(p).__name__}")
        _known(p, {"name", "critique", "revision", "comparison"}, at)
        for key in ("name", "critique", "revision"):
            if not _text(p.get(key)):
                raise ConfigError(f"{at}: '{key}' is required (a non-empty string)")
        q = p.get("comparison", default_q)
        if not _text(q):
            raise ConfigError(f"{at}: 'comparison' is required (a non-empty string) when the constitution has no "
                              f"top-level comparison question")
        if p["name"] in seen:
            raise ConfigError(f"{at}: duplicate principle name {p['name']!r}")
        seen.add(p["name"])
        parsed.append(Principle(p["name"], p["critique"].strip(), p["revision"].strip(), q.strip()))
    answers = d.get("answers", list(Constitution.answers))
    if (not isinstance(answers, list) or len(answers) != 2 or not all(_text(a) for a in answers)
            or answers[0] == answers[1]):
        raise ConfigError(f"{where}: answers must be two different non-empty strings (the continuations scored for "
                          f"the first and the second response), got {answers!r}")
    return Constitution(tuple(parsed), str(d.get("name", "custom")), tuple(answers), _templates(d, where))


def _templates(d: dict, where: str) -> Templates:
    t = d.get("templates") or {}
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: templates must be a mapping of template name: text")
    _known(t, {f.name for f in fields(Templates)}, f"{where}: templates")
    for key, text in t.items():
        at = f"{where}: templates.{key}"
        if not isinstance(text, str):
            raise ConfigError(f"{at}: expected a string")
        try:
            names = {n for _, n, _, _ in string.Formatter().parse(text) if n is not None}
        except ValueError as e:
            raise ConfigError(f"{at}: not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
        required, allowed = PLACEHOLDERS[key]
        if required - names:
            raise ConfigError(f"{at}: must contain {_braced(required - names)}")
        if names - allowed:
            raise ConfigError(f"{at}: unknown placeholder(s) {_braced(names - allowed)}; allowed: "
                              f"{_braced(allowed) or 'none'}")
    return Templates(**t)


def _known(d: dict, allowed: set[str], where: str) -> None:
    bad = sorted(set(d) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(map(str, bad))}; expected "
                          f"{', '.join(sorted(allowed))}")


def _text(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _braced(names) -> str:
    return ", ".join("{" + n + "}" for n in sorted(names))
