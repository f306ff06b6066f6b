"""AI labelers (RLAIF, Lee et al. 2023; the preference model of Constitutional AI, Bai et al. 2022): a judge answers a
constitution's comparison question for a pair of responses, scored by the log-probabilities of the answer options
(" (A)" / " (B)"), never by parsing free text.

    judge = load_judge("path/or/hub-id", constitution="c.yaml", cot=False)   # or "module:function"
    verdicts = judge_pairs(judge, prompts, a, b, both_orders=True, seed=0)  # one PairVerdict per pair
    summary = judge_project(store, "round-1", judge)                       # into the store as a labeler of kind "ai"
    ai_win_rate(judge, prompts, policy_responses, reference_responses)     # `alignloop eval --judge`

Per order, P(first shown is better) = softmax over the two options' summed log-probabilities, after the comparison
prompt (optionally after the judge's own chain-of-thought, generated first). Position bias is removed by judging
both orders and averaging: p(a) = ½ [P₁(a first) + (1 − P₂(b first))]; a judge that always prefers the first shown
gets p(a) = ½ for every pair (a tie), whatever the responses. The choice is the more probable response (a tie within
`TIE_TOLERANCE` of ½); its probability, the confidence, is kept exactly in `details` and as the nearest strength
name (`strength_of`). Rank items are judged through their K(K−1)/2 pairs and ranked by summed win probability.

A Python-function judge: `f(prompts, firsts, seconds, questions) -> list[float]`, each P(first is better) in [0, 1]
for one order; it is judged in both orders like a model.

Shapes: N = pairs judged in one call (one order each).
"""
from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from alignloop.ai_feedback.constitution import Constitution, Principle, load_constitution
from alignloop.data import pad_batch, position_ids_from_attention_mask
from alignloop.errors import UserError
from alignloop.models import load_causal_lm, load_tokenizer
from alignloop.models.logps import completion_logps
from alignloop.rollout import SamplingParams, encode_prompts, sample_completions
from alignloop.scoring import is_function_spec, load_function

TIE_TOLERANCE = 1e-6
# confidence (the probability of the choice) -> the store's strength names, strongest first
STRENGTH_CUTS = ((0.9, "significantly_better"), (0.75, "better"), (0.6, "slightly_better"))


def strength_of(confidence: float) -> str:
    for cut, name in STRENGTH_CUTS:
        if confidence >= cut:
            return name
    return "negligibly_better"


@dataclass
class PairVerdict:
    """The judgement of one pair (a, b) in canonical terms."""
    p_a: float                       # P(a is better), averaged over the orders judged
    choice: str                      # "a" | "b" | "tie"
    confidence: float                # probability of the choice (½ for a tie)
    principle: str                   # the principle asked ("all": averaged over every principle)
    p_orders: list[float]            # P(a is better) from each order judged (first: a shown first)
    raw_picks: list[int | None]      # per order: the position picked (0 = first shown; None: exactly even)
    first_shown: list[str] = field(default_factory=list)   # per order: "a" or "b"
    rationales: list[str] = field(default_factory=list)    # chain-of-thought per order (empty without)

    @property
    def strength(self) -> str | None:
        return None if self.choice == "tie" else strength_of(self.confidence)

    def details(self) -> dict:
        return {"p_a": self.p_a, "confidence": self.confidence, "principle": self.principle,
                "p_orders": self.p_orders, "raw_picks": self.raw_picks, "first_shown": self.first_shown,
                **({"rationales": self.rationales} if self.rationales else {})}


# ------------------------------------------------------------------------------------------------ judges
class LMJudge:
    """A causal LM answering the comparison question. `cot`: it first writes its reasoning after the constitution's
    CoT prefix (greedy, up to `cot_max_new_tokens`, cut at a blank line), then the answers are scored after it."""

    def __init__(self, model, tokenizer, constitution: Constitution, name: str = "model", cot: bool = False,
                 cot_max_new_tokens: int = 64, batch_size: int = 16, max_length: int | None = None):
        self.model, self.tokenizer, self.constitution, self.name = model.eval(), tokenizer, constitution, name
        self.cot, self.cot_max_new_tokens, self.batch_size = cot, cot_max_new_tokens, batch_size
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None) or \
            getattr(model.config, "n_positions", None)
        self.answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in constitution.answers]
        if not all(self.answer_ids) or self.answer_ids[0] == self.answer_ids[1]:
            raise UserError(f"the judge's tokenizer encodes the answers {constitution.answers} to empty or equal "
                            f"tokens; choose other answer strings in the constitution")

    def prob_first(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str],
                   principles: Sequence[Principle]) -> tuple[list[float], list[str]]:
        """P(first is better) for each pair shown in this order -> ([N] probabilities, [N] rationales)."""
        c, tok = self.constitution, self.tokenizer
        rationales = [""] * len(prompts)
        if self.cot:
            heads = [c.reasoning_prompt(p, f, s, q, tok)
                     for p, f, s, q in zip(prompts, firsts, seconds, principles, strict=True)]
            params = SamplingParams(max_new_tokens=self.cot_max_new_tokens, top_k=1, stop_strings=("\n\n",))
            groups = sample_completions(self.model, tok, heads, 1, params, batch_size=self.batch_size)
            rationales = [g[0].text.split("\n\n")[0].rstrip() for g in groups]
        texts = [c.comparison_prompt(p, f, s, q, tok, reasoning=r if self.cot else None)
                 for p, f, s, q, r in zip(prompts, firsts, seconds, principles, rationales, strict=True)]
        logps = self._option_logps(texts)                                     # [N, 2]
        return torch.softmax(logps, dim=1)[:, 0].tolist(), rationales

    @torch.no_grad()
    def _option_logps(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, 2]: the summed log-probability of each answer option after each text."""
        contexts = encode_prompts(self.tokenizer, texts)
        longest = max(map(len, self.answer_ids))
        if self.max_length and max(map(len, contexts)) + longest > self.max_length:
            n = max(map(len, contexts)) + longest
            raise UserError(f"a comparison prompt has {n} tokens with its answer, more than the judge's "
                            f"{self.max_length} positions; use shorter responses or templates, or a longer model")
        rows, masks = [], []
        for ctx in contexts:
            for ans in self.answer_ids:
                rows.append(ctx + ans)
                masks.append([0] * len(ctx) + [1] * len(ans))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        device = next(self.model.parameters()).device
        step = max(1, self.batch_size) * 2
        for lo in range(0, len(rows), step):
            ids, att = pad_batch(rows[lo:lo + step], pad, "right")
            rmask, _ = pad_batch(masks[lo:lo + step], 0, "right")
            batch = {"input_ids": ids, "attention_mask": att, "position_ids": position_ids_from_attention_mask(att),
                     "response_mask": rmask.bool()}
            out.append(completion_logps(self.model, {k: v.to(device) for k, v in batch.items()}).float().cpu())
        return torch.cat(out).view(-1, 2)


class FunctionJudge:
    """A Python function `f(prompts, firsts, seconds, questions) -> list[float]` (P(first is better) per pair)."""

    def __init__(self, fn: Callable, constitution: Constitution, name: str = "function"):
        self.fn, self.constitution, self.name = fn, constitution, name

    def prob_first(self, prompts, firsts, seconds, principles) -> tuple[list[float], list[str]]:
        ps = [float(x) for x in self.fn(list(prompts), list(firsts), list(seconds),
                                        [p.comparison for p in principles])]
        if len(ps) != len(prompts) or not all(0.0 <= p <= 1.0 for p in ps):
            raise UserError(f"judge function {self.name}: must return one probability in [0, 1] per pair "
                            f"({len(prompts)}), got {ps[:5]}{'...' if len(ps) > 5 else ''}")
        return ps, [""] * len(ps)


def load_judge(spec: str, constitution=None, *, cot: bool = False, cot_max_new_tokens: int = 64,
               batch_size: int = 16, dtype=None) -> LMJudge | FunctionJudge:
    """A judge from a `module:function` spec or a causal LM (local folder or hub id)."""
    c = load_constitution(constitution)
    if is_function_spec(spec):
        return FunctionJudge(load_function(spec), c, name=spec)
    model, tok = load_causal_lm(spec, dtype=dtype), load_tokenizer(spec, padding_side="left")
    return LMJudge(model, tok, c, name=spec, cot=cot, cot_max_new_tokens=cot_max_new_tokens, batch_size=batch_size)


# ------------------------------------------------------------------------------------------------ judging pairs
def judge_pairs(judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], *, both_orders: bool = True,
                principles: str = "sample", seed: int = 0, first_shown: Sequence[str] | None = None
                ) -> list[PairVerdict]:
    """One verdict per pair (a[i], b[i]) after prompts[i]. `principles`: "sample" (one principle drawn per pair, as
    Bai et al. ensemble over principles) or "all" (each pair asked every principle, probabilities averaged).
    `first_shown`: with one order, which of each pair is shown first ("a"/"b"; default: drawn at random, so the
    judge's position bias is noise, not a bias towards a); with both orders, the first order judged."""
    c: Constitution = judge.constitution
    if principles not in ("sample", "all"):
        raise UserError(f"principles must be 'sample' or 'all', got {principles!r}")
    rng = random.Random(seed)
    n = len(prompts)
    asked = [list(c.principles) if principles == "all" else [c.sample(rng)] for _ in range(n)]
    first = list(first_shown) if first_shown is not None else [rng.choice("ab") for _ in range(n)]
    orders = [first, ["b" if f == "a" else "a" for f in first]] if both_orders else [first]
    # every (pair, principle, order) in one batch per order: P(a is better) from each
    p_by_order, why_by_order = [], []
    flat = [(i, q) for i in range(n) for q in asked[i]]
    for shown in orders:
        fs = [a[i] if shown[i] == "a" else b[i] for i, _ in flat]
        ss = [b[i] if shown[i] == "a" else a[i] for i, _ in flat]
        p1, why = judge.prob_first([prompts[i] for i, _ in flat], fs, ss, [q for _, q in flat]) if flat else ([], [])
        pa = [p if shown[i] == "a" else 1.0 - p for (i, _), p in zip(flat, p1, strict=True)]
        p_by_order.append(_per_pair(pa, flat, n))
        why_by_order.append(_first_per_pair(why, flat, n))
    out = []
    for i in range(n):
        p_orders = [p[i] for p in p_by_order]
        p_a = sum(p_orders) / len(p_orders)
        choice = "tie" if abs(p_a - 0.5) <= TIE_TOLERANCE else "a" if p_a > 0.5 else "b"
        picks = []
        for shown, pa in zip(orders, p_orders, strict=True):
            p_first = pa if shown[i] == "a" else 1.0 - pa
            picks.append(None if abs(p_first - 0.5) <= TIE_TOLERANCE else 0 if p_first > 0.5 else 1)
        out.append(PairVerdict(
            p_a=p_a, choice=choice, confidence=max(p_a, 1.0 - p_a), raw_picks=picks, p_orders=p_orders,
            principle=asked[i][0].name if len(asked[i]) == 1 else "all", first_shown=[o[i] for o in orders],
            rationales=[w[i] for w in why_by_order] if any(w[i] for w in why_by_order) else []))
    return out


def _per_pair(values: list[float], flat: list[tuple[int, Principle]], n: int) -> list[float]:
    sums, counts = [0.0] * n, [0] * n
    for (i, _), v in zip(flat, values, strict=True):
        sums[i] += v
        counts[i] += 1
    return [s / max(1, k) for s, k in zip(sums, counts, strict=True)]


def _first_per_pair(values: list[str], flat: list[tuple[int, Principle]], n: int) -> list[str]:
    out = [""] * n
    for (i, _), v in zip(flat, values, strict=True):
        out[i] = out[i] or v
    return out


def ranking_from_pairs(k: int, wins: dict[tuple[int, int], float]) -> list[int]:
    """Ranks (1 = best; equal scores share a rank) of k completions from P(i beats j) of each judged pair i < j:
    each completion's score is its summed win probability (Borda count with probabilities)."""
    score = [0.0] * k
    for (i, j), p in wins.items():
        score[i] += p
        score[j] += 1.0 - p
    order = sorted(range(k), key=lambda x: -score[x])
    ranks = [0] * k
    for pos, x in enumerate(order):
        same = pos > 0 and math.isclose(score[x], score[order[pos - 1]], abs_tol=TIE_TOLERANCE)
        ranks[x] = ranks[order[pos - 1]] if same else pos + 1
    return ranks


# ------------------------------------------------------------------------------------------------ win rate
def ai_win_rate(judge, prompts: Sequence[str], policy: Sequence[str], reference: Sequence[str], *,
                both_orders: bool = True, principles: str = "sample", seed: int = 0) -> dict[str, float]:
    """The policy's win rate against the reference as the judge sees it: the mean P(policy is better) over the
    prompts (identical responses count ½), and the share of decisive wins."""
    verdicts = judge_pairs(judge, prompts, policy, reference, both_orders=both_orders, principles=principles,
                           seed=seed)
    probs = [0.5 if p == r else v.p_a for v, p, r in zip(verdicts, policy, reference, strict=True)]
    wins = [1.0 if v.choice == "a" else 0.5 if v.choice == "tie" or p == r else 0.0
            for v, p, r in zip(verdicts, policy, reference, strict=True)]
    n = max(1, len(probs))
    return {"ai/win_rate": sum(wins) / n, "ai/win_probability": sum(probs) / n, "ai/pairs": len(probs),
            "ai/judge": judge.name}


# ------------------------------------------------------------------------------------------------ the store
def prompt_text(messages: list[dict]) -> str:
    """An item's prompt as the comparison template's {prompt}: a one-message prompt as it is, a conversation as
    "Human: ... / Assistant: ..." turns."""
    if len(messages) == 1:
        return str(messages[0]["content"])
    who = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{who.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def project_items(store, project_id: int) -> list:
    """Every item of the project (gold ones too: the AI's accuracy on them is measured like a person's)."""
    from sqlalchemy import select  # noqa: PLC0415 - the web extra: only judging a store needs it

    from alignloop.feedback.models import Item  # noqa: PLC0415 - the web extra (as above)

    with store.read() as s:
        return list(s.scalars(select(Item).where(Item.project_id == project_id).order_by(Item.id)))


def judge_project(store, project: str | int, judge, *, labeler: str | None = None, both_orders: bool = True,
                  principles: str = "sample", seed: int = 0, limit: int | None = None) -> dict:
    """Judge every item of a pairwise or rank project (rank: through its pairs) and store the judgements as the AI
    labeler `labeler` (default `default_labeler_name`; kind "ai", its model the judge's name). AI judgements never take
    a person's place in the queue. Returns counts, position bias before (single-order picks of the first shown)
    and after debiasing (final picks of the first shown), and the labeler's name."""
    p = store.get_project(project)
    if p.task_type not in ("pairwise", "rank"):
        raise UserError(f"project {p.name}: an AI labeler judges pairwise or rank items, not {p.task_type}")
    items = project_items(store, p.id)
    items = items[:limit] if limit else items
    prompts, comps = store.prompts_and_completions(p.id)
    name = labeler or default_labeler_name(judge.name)
    lab = store.add_ai_labeler(name, judge.name)
    jobs = [(item, i, j) for item in items for i in range(len(item.completion_ids))
            for j in range(i + 1, len(item.completion_ids))]
    verdicts = judge_pairs(judge, [prompt_text(prompts[it.prompt_id].messages) for it, _, _ in jobs],
                           [comps[it.completion_ids[i]].text for it, i, _ in jobs],
                           [comps[it.completion_ids[j]].text for it, _, j in jobs],
                           both_orders=both_orders, principles=principles, seed=seed)
    by_item: dict[int, list[tuple[int, int, PairVerdict]]] = {}
    for (it, i, j), v in zip(jobs, verdicts, strict=True):
        by_item.setdefault(it.id, []).append((i, j, v))
    rows = [_judgement(it, by_item.get(it.id, [])) for it in items if by_item.get(it.id)]
    written = store.record_ai_judgements(p.id, lab.id, rows)
    raw = [x for v in verdicts for x in v.raw_picks if x is not None]
    final = [0 if v.choice == v.first_shown[0] else 1 for v in verdicts if v.choice != "tie"]
    return {"project": p.name, "labeler": name, "model": judge.name, "items": len(rows), "pairs": len(verdicts),
            "judgements_written": written, "ties": sum(v.choice == "tie" for v in verdicts),
            "both_orders": both_orders, "principles": principles,
            "position_bias_before": sum(x == 0 for x in raw) / len(raw) if raw else None,
            "position_bias_after": sum(x == 0 for x in final) / len(final) if final else None,
            "order_consistency": _consistency(verdicts) if both_orders else None}


def default_labeler_name(spec: str) -> str:
    """"ai-" and the judge's folder (its last two path parts: "base/final" -> "ai-base-final") or module:function,
    in the store's name characters."""
    tail = "-".join(spec.replace("\\", "/").rstrip("/").split("/")[-2:])
    return ("ai-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", tail).strip("-"))[:100]


def _judgement(item, judged: list[tuple[int, int, PairVerdict]]) -> dict:
    """The store row of one item: a pairwise item's verdict, or a rank item's ranking from its pairs."""
    if len(item.completion_ids) == 2:
        v = judged[0][2]
        shown = [0, 1] if v.first_shown[0] == "a" else [1, 0]
        pick = None if v.choice == "tie" else 0 if v.choice == v.first_shown[0] else 1
        return {"item_id": item.id, "shown_order": shown, "choice": v.choice, "strength": v.strength,
                "picked_position": pick, "details": v.details()}
    ranking = ranking_from_pairs(len(item.completion_ids), {(i, j): v.p_a for i, j, v in judged})
    return {"item_id": item.id, "shown_order": list(range(len(item.completion_ids))), "ranking": ranking,
            "details": {"pairs": [{"i": i, "j": j, **v.details()} for i, j, v in judged],
                        "raw_picks": [x for _, _, v in judged for x in v.raw_picks]}}


def _consistency(verdicts: list[PairVerdict]) -> float | None:
    """Share of pairs whose two orders agree on the better response (Lee et al.'s position consistency)."""
    both = [v for v in verdicts if len(v.p_orders) == 2]
    if not both:
        return None
    return sum((v.p_orders[0] > 0.5) == (v.p_orders[1] > 0.5) for v in both) / len(both)
