"""Conversions between preference shapes: rankings -> pairs, strength labels -> margins, implicit prompts,
groups -> flat TRL rows, preference -> unpaired."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# Llama 2 (Touvron et al. 2023), Table 28: margin by preference strength, in the "small" and "large" variants.
STRENGTH_MARGINS: dict[str, dict[str, float]] = {
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}
STRENGTH_ALIASES = {"unsure": "negligibly_better"}


class Pair(NamedTuple):
    """One preference: `chosen` preferred to `rejected` by `margin` (0 when unknown). `tie`: the two were ranked
    equal (margin 0; only with include_ties) — see the package docstring for how a trainer should treat ties."""
    chosen: Any
    rejected: Any
    margin: float = 0.0
    tie: bool = False


@dataclass
class PreferenceGroup:
    """The pairs of one prompt, kept together so a trainer can put them in one batch element.

    prompt: a string (or a list of messages before chat templating); pairs: list of `Pair`;
    pair_weight: the weight of each pair in the loss, 1/C(K,2) for a ranking of K completions (InstructGPT), 1 for a
    plain pair; completions/ranking: the original ranking (K completions and their ranks, 1 = best), or None;
    meta: the row's labeler context (`META_COLUMNS` present in it: labeler, labeler_attributes, comment, flags,
    time_spent_ms, criterion; consensus rows labelers, comments), validated; empty when the data has none."""
    prompt: Any
    pairs: list[Pair]
    pair_weight: float = 1.0
    completions: list | None = None
    ranking: list[int] | None = None
    where: str | None = field(default=None, repr=False, compare=False)
    meta: dict[str, Any] = field(default_factory=dict)


def normalize_strength(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    return STRENGTH_ALIASES.get(key, key)


def strength_to_margin(strength: str, mapping: str | dict[str, float] = "small") -> float:
    """The margin for a preference strength label (Llama 2, Table 28). `mapping`: "small" (default: significantly
    better 1, better 2/3, slightly better 1/3, negligibly better/unsure 0), "large" (3, 2, 1, 0) or a dict
    {strength name: margin}. Names are case-insensitive; spaces and hyphens count as underscores; "unsure" is
    "negligibly_better". Raises ValueError for an unknown name."""
    table = STRENGTH_MARGINS[mapping] if isinstance(mapping, str) else {normalize_strength(k): float(v)
                                                                         for k, v in mapping.items()}
    key = normalize_strength(strength)
    if key not in table:
        raise ValueError(f"unknown preference strength {strength!r}; expected one of {', '.join(table)}"
                         + (" (or unsure)" if "negligibly_better" in table else ""))
    return float(table[key])


def rankings_to_pairs(completions: list, ranking: list[int], include_ties: bool = False) -> list[Pair]:
    """All C(K,2) pairs of a ranking of K completions (rank 1 = best; equal ranks are ties), in index order (i < j).
    Ties are left out unless `include_ties` (then they are `Pair(a, b, 0.0, tie=True)` with a = the earlier one).
    E.g. completions [a, b, c], ranking [2, 1, 3] -> [(b, a), (a, c), (b, c)]."""
    if len(completions) != len(ranking):
        raise ValueError(f"{len(completions)} completions but {len(ranking)} ranks")
    pairs = []
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if ranking[i] < ranking[j]:
                pairs.append(Pair(completions[i], completions[j]))
            elif ranking[j] < ranking[i]:
                pairs.append(Pair(completions[j], completions[i]))
            elif include_ties:
                pairs.append(Pair(completions[i], completions[j], 0.0, True))
    return pairs


def ranking_pair_weight(k: int) -> float:
    """1/C(K,2): InstructGPT's scaling, so every prompt weighs the same whatever its K."""
    return 1.0 / math.comb(k, 2)


def implicit_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two texts with a shared start into (prompt, chosen, rejected). The prompt is the longest common prefix
    cut back to just before a whitespace character (so each completion starts with its space, as byte-level BPE
    tokenizers expect: "A: 4" / "A: 5" -> "A:", " 4", " 5"), and never the whole of either text.
    With no such boundary the prompt is empty. Raises ValueError when the texts are equal."""
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical, so there is no completion to compare")
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    # cut at position i (prompt = s[:i]) where s[i] is whitespace in both; i <= n, i < len(both)
    for i in range(n, 0, -1):
        if i < len(chosen) and i < len(rejected) and chosen[i].isspace() and rejected[i].isspace():
            return chosen[:i], chosen[i:], rejected[i:]
    return "", chosen, rejected


def implicit_messages_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Conversational implicit prompt: all but the final assistant message, which both must share."""
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not conv or conv[-1].get("role") != "assistant":
            raise ValueError(f"'{name}' must end with an assistant message to take the prompt from the shared "
                             f"messages before it")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected must share every message before their final assistant message")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def groups_to_rows(groups: list[PreferenceGroup], with_ties: bool = False) -> list[dict]:
    """Flatten groups into TRL preference rows {prompt, chosen, rejected, margin, pair_weight, group} (+ tie when
    `with_ties`), each followed by its group's `meta` columns. `group` numbers the groups from 0; `read`ing these
    rows back regroups them (same `group`, same meta)."""
    rows = []
    for g_index, g in enumerate(groups):
        for p in g.pairs:
            row = {"prompt": g.prompt, "chosen": p.chosen, "rejected": p.rejected, "margin": p.margin,
                   "pair_weight": g.pair_weight, "group": g_index}
            if with_ties:
                row["tie"] = p.tie
            rows.append(row | g.meta)
    return rows


def groups_to_unpaired(groups: list[PreferenceGroup]) -> list[dict]:
    """KTO-style rows {prompt, completion, label}: for a plain pair, chosen -> True and rejected -> False; for a
    ranking, the best-ranked completions -> True, the worst-ranked -> False, the ones in between are left out. Each
    row carries its group's `meta` columns (who judged it, under which criterion)."""
    rows = []
    for g in groups:
        if g.ranking is not None and g.completions is not None:
            best, worst = min(g.ranking), max(g.ranking)
            labelled = [(c, r == best) for c, r in zip(g.completions, g.ranking, strict=True)
                        if r in (best, worst) and best != worst]
        else:
            labelled = [x for p in g.pairs if not p.tie for x in ((p.chosen, True), (p.rejected, False))]
        rows += [{"prompt": g.prompt, "completion": c, "label": label} | g.meta for c, label in labelled]
    return rows
