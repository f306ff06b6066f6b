"""Tokenisation with completion-only labels, an explicit truncation policy, and padding-free packing.

Prompt and completion are tokenised separately (no special tokens) and concatenated, so the prompt tokens are
identical for a pair's chosen and rejected completions and the prompt/completion boundary is exact.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignloop.data.chat import check_chat_template
from alignloop.data.conversions import PreferenceGroup
from alignloop.data.errors import DataStats
from alignloop.data.records import is_conversational, render_record

IGNORE_INDEX = -100
TRUNCATIONS = ("keep_end", "keep_start", "drop")


def _render_all(records: list, tokenizer) -> list:
    out = []
    for i, r in enumerate(records):
        if is_conversational(r):
            check_chat_template(tokenizer, f"record {i}")
            r = render_record(r, tokenizer)
        out.append(r)
    return out


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def ends_with_eos(completion_ids: list[int], tokenizer) -> bool:
    """The completion already ends its turn: its last token is EOS, or EOS followed only by whitespace (a chat
    template closes each turn with its end token and a newline: ChatML's "<|im_end|>\n")."""
    eos = tokenizer.eos_token_id
    tail = completion_ids[-4:]
    if eos is None or eos not in tail:
        return False
    last = len(tail) - 1 - tail[::-1].index(eos)
    return tokenizer.decode(tail[last + 1:]).strip() == ""


def with_bos_eos(prompt_ids: list[int], completion_ids: list[int], tokenizer, add_eos: bool, add_bos: bool):
    """BOS before the prompt (`add_bos`) unless there; EOS after the completion (`add_eos`) unless it already ends
    its turn (`ends_with_eos`). Every trainer and the reward scoring tokenise through this one rule."""
    if add_bos and tokenizer.bos_token_id is not None and (not prompt_ids or prompt_ids[0] != tokenizer.bos_token_id):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if add_eos and tokenizer.eos_token_id is not None and not ends_with_eos(completion_ids, tokenizer):
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def truncate(prompt_ids: list[int], completions: list[list[int]], max_length: int | None, truncation: str = "keep_end",
             max_prompt_length: int | None = None) -> tuple[list[int], list[list[int]], bool] | None:
    """Fit prompt + the longest completion into `max_length` tokens. Returns (prompt_ids, completions, truncated) or
    None when the example must be dropped.

    - "keep_end" (default): cut the prompt from the left first (keeping its end, but at least
      min(len(prompt), max_prompt_length) tokens; max_prompt_length defaults to max_length // 2), then cut the
      completions at their end.
    - "keep_start": keep the first max_length tokens (cut the completions' ends, then the prompt's end).
    - "drop": drop the example.
    An example left with an empty completion is dropped."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    longest = max(len(c) for c in completions)
    if max_length is None or len(prompt_ids) + longest <= max_length:
        return prompt_ids, completions, False
    if truncation == "drop":
        return None
    if truncation == "keep_start":
        keep_prompt = min(len(prompt_ids), max_length)
    else:
        floor = min(len(prompt_ids), max_length // 2 if max_prompt_length is None else max_prompt_length)
        keep_prompt = min(len(prompt_ids), max(max_length - longest, floor))
    room = max_length - keep_prompt
    if room <= 0:
        return None
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:] if truncation == "keep_end" else prompt_ids[:keep_prompt]
    completions = [c[:room] for c in completions]
    if any(not c for c in completions):
        return None
    return prompt_ids, completions, True


def tokenize_sft(records: list[dict], tokenizer, *, max_length: int | None = None, truncation: str = "keep_end",
                 max_prompt_length: int | None = None, add_eos: bool = True, add_bos: bool = False,
                 all_assistant_turns: bool = True, stats: DataStats | None = None) -> tuple[list[dict], DataStats]:
    """SFT records -> examples {"input_ids": [T], "labels": [T] (-100 on prompt tokens), "prompt_length": int}.
    EOS is appended to each completion unless it already ends with it (`add_eos`; a record's own `add_eos: False`
    keeps it off that one: a completion cut short must not teach stopping there); `add_bos` prepends BOS to the
    prompt (chat templates usually include it). `all_assistant_turns`: in a conversation every assistant turn is a
    target (TRL's assistant-only loss), not only the last one (the record's completion); needs a fast tokenizer and a
    template whose renders of the conversation's prefixes are prefixes of each other, else only the last turn is
    trained. Truncated/dropped counts go to the returned stats."""
    stats = stats if stats is not None else DataStats(kind="sft")
    records = _render_all(records, tokenizer)
    turns = [r.get("assistant_spans") if all_assistant_turns else None for r in records]
    prompts, targets = _encode_with_targets(tokenizer, [r["prompt"] for r in records], turns)
    completions = _encode_many(tokenizer, [r["completion"] for r in records])
    out = []
    for r, p, t, c in zip(records, prompts, targets, completions, strict=True):
        n = len(p)
        p, c = with_bos_eos(p, c, tokenizer, add_eos and r.get("add_eos", True), add_bos)
        t = [False] * (len(p) - n) + t
        if not c:
            stats.dropped += 1
            continue
        fitted = truncate(p, [c], max_length, truncation, max_prompt_length)
        if fitted is None:
            stats.dropped += 1
            continue
        kept, (c,), was_truncated = fitted
        # truncation keeps a prefix (keep_start) or a suffix (keep_end) of the prompt: its targets follow
        t = t[:len(kept)] if truncation == "keep_start" else t[len(p) - len(kept):]
        p = kept
        stats.truncated += was_truncated
        labels = [tok if is_target else IGNORE_INDEX for tok, is_target in zip(p, t, strict=True)] + c
        out.append({"input_ids": p + c, "labels": labels, "prompt_length": len(p)})
    return out, stats


def _encode_with_targets(tokenizer, texts: list[str], spans: list) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids of `texts` (as `_encode_many`) and, per token, whether it lies in one of its text's target spans
    (through the fast tokenizer's character offsets, taken in the same tokenizer call)."""
    if not texts or not any(spans) or not getattr(tokenizer, "is_fast", False):
        ids = _encode_many(tokenizer, texts)
        return ids, [[False] * len(x) for x in ids]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids = [list(x) for x in enc["input_ids"]]
    targets = [[bool(sp) and any(s < end and e > start for start, end in sp) for s, e in offsets]
               for sp, offsets in zip(spans, enc["offset_mapping"], strict=True)]
    return ids, targets


def tokenize_preferences(groups: list[PreferenceGroup], tokenizer, *, max_length: int | None = None,
                         truncation: str = "keep_end", max_prompt_length: int | None = None, add_eos: bool = True,
                         add_bos: bool = False, stats: DataStats | None = None) -> tuple[list[dict], DataStats]:
    """Preference groups -> tokenised groups {"pairs": [pair, ...], "pair_weight": float} (+ "meta" when the group
    has labeler context), each pair {"chosen_input_ids", "rejected_input_ids", "chosen_labels", "rejected_labels"
    (-100 on the prompt), "prompt_length", "margin", "tie"}. Truncation is per pair and keeps chosen and rejected on
    the same prompt tokens; `stats.truncated`/`stats.dropped` count pairs. A group whose pairs are all dropped is
    left out."""
    stats = stats if stats is not None else DataStats(kind="preference")
    groups = _render_all(groups, tokenizer)
    prompts = _encode_many(tokenizer, [g.prompt for g in groups])
    texts = sorted({t for g in groups for p in g.pairs for t in (p.chosen, p.rejected)})
    ids = dict(zip(texts, _encode_many(tokenizer, texts), strict=True))
    out = []
    for g, prompt_ids in zip(groups, prompts, strict=True):
        pairs = []
        for pair in g.pairs:
            p, c = with_bos_eos(prompt_ids, ids[pair.chosen], tokenizer, add_eos, add_bos)
            _, r = with_bos_eos(prompt_ids, ids[pair.rejected], tokenizer, add_eos, False)
            fitted = truncate(p, [c, r], max_length, truncation, max_prompt_length)
            if fitted is None:
                stats.dropped += 1
                continue
            p, (c, r), was_truncated = fitted
            stats.truncated += was_truncated
            pairs.append({"chosen_input_ids": p + c, "rejected_input_ids": p + r,
                          "chosen_labels": [IGNORE_INDEX] * len(p) + c, "rejected_labels": [IGNORE_INDEX] * len(p) + r,
                          "prompt_length": len(p), "margin": float(pair.margin), "tie": bool(pair.tie)})
        if pairs:
            out.append({"pairs": pairs, "pair_weight": float(g.pair_weight)} | ({"meta": g.meta} if g.meta else {}))
    return out, stats


def tokenize_rankings(groups: list[PreferenceGroup], tokenizer, *, max_length: int | None = None,
                      truncation: str = "keep_end", max_prompt_length: int | None = None, add_eos: bool = True,
                      add_bos: bool = False, stats: DataStats | None = None) -> tuple[list[dict], DataStats]:
    """Preference groups -> one entry per group with each distinct completion tokenised once (for a reward model
    that scores each of K completions once instead of once per pair; collate with `RankingCollator`):
    {"input_ids": [K][T], "labels": [K][T] (-100 on the prompt), "prompt_length", "ranking": [K] or None (a single
    pair is the ranking [1, 2]; merged flat pairs without a ranking have None),
    "pairs": [[chosen i, rejected j, margin, tie], ...] (indices into the K), "pair_weight"} (+ "meta", the group's
    labeler context, when it has any: which head of a multi-head reward model it trains).
    Completions are those of the ranking, or the distinct texts of the pairs in order. Truncation fits the prompt
    and the longest completion; `stats.truncated`/`stats.dropped` count groups here."""
    stats = stats if stats is not None else DataStats(kind="ranking")
    groups = _render_all(groups, tokenizer)
    prompts = _encode_many(tokenizer, [g.prompt for g in groups])
    out = []
    for g, prompt_ids in zip(groups, prompts, strict=True):
        texts = list(g.completions) if g.completions is not None else []
        for pair in g.pairs:
            texts += [t for t in (pair.chosen, pair.rejected) if t not in texts]
        index = {t: i for i, t in enumerate(texts)}
        finished = [with_bos_eos(prompt_ids, c, tokenizer, add_eos, add_bos) for c in _encode_many(tokenizer, texts)]
        fitted = truncate(finished[0][0], [c for _, c in finished], max_length, truncation, max_prompt_length)
        if fitted is None:
            stats.dropped += 1
            continue
        p, completions, was_truncated = fitted
        stats.truncated += was_truncated
        out.append({"input_ids": [p + c for c in completions],
                    "labels": [[IGNORE_INDEX] * len(p) + c for c in completions], "prompt_length": len(p),
                    "ranking": _ranking_of(g),
                    "pairs": [[index[x.chosen], index[x.rejected], float(x.margin), bool(x.tie)] for x in g.pairs],
                    "pair_weight": float(g.pair_weight)} | ({"meta": g.meta} if g.meta else {}))
    return out, stats


def _ranking_of(g: PreferenceGroup) -> list[int] | None:
    """The group's ranking; a single strict pair is the ranking [1, 2]; other groups have none."""
    if g.ranking is not None:
        return list(g.ranking)
    if len(g.pairs) == 1 and not g.pairs[0].tie:
        return [1, 2]
    return None


def reward_input_ids(tokenizer, prompts: Sequence[str], completions: Sequence[str],
                     add_eos: bool | Sequence[bool] = True, max_length: int | None = None) -> list[list[int]]:
    """Token ids of prompt + completion exactly as the reward-model trainer builds its training sequences
    (`tokenize_preferences`): each part tokenised without special tokens, EOS appended to the completion unless it
    already ends with EOS (`add_eos`: one flag for all rows, or one per row), and a sequence longer than `max_length`
    cut like rm's default truncation "keep_end" (the prompt from the left first, then the completion's end)."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
    eos = [add_eos] * len(prompts) if isinstance(add_eos, bool) else [bool(x) for x in add_eos]
    if len(eos) != len(prompts):
        raise ValueError(f"got {len(eos)} add_eos flags for {len(prompts)} completions")
    filler = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (tokenizer.pad_token_id or 0)
    out = []
    for p, c, e in zip(_encode_many(tokenizer, list(prompts)), _encode_many(tokenizer, list(completions)), eos,
                       strict=True):
        p, c = with_bos_eos(p, c, tokenizer, e, False)
        if max_length is not None and len(p) + len(c) > max_length:
            fitted = truncate(p, [c], max_length, "keep_end")
            p, c = (fitted[0], fitted[1][0]) if fitted is not None else ([], (p + c)[-max_length:])
        out.append(p + c or [filler])  # never an empty row (empty prompt and completion without EOS)
    return out


def tokenize_prompts(records: list[dict], tokenizer, *, max_length: int | None = None, add_bos: bool = False,
                     stats: DataStats | None = None) -> tuple[list[dict], DataStats]:
    """Prompt records -> {"input_ids"} for generation; prompts longer than max_length keep their last max_length
    tokens (counted in stats.truncated). Collate with SFTCollator(pad_id, padding_side="left")."""
    stats = stats if stats is not None else DataStats(kind="prompt")
    records = _render_all(records, tokenizer)
    out = []
    for ids in _encode_many(tokenizer, [r["prompt"] for r in records]):
        ids, _ = with_bos_eos(ids, [], tokenizer, False, add_bos)
        if max_length is not None and len(ids) > max_length:
            ids = ids[len(ids) - max_length:]
            stats.truncated += 1
        out.append({"input_ids": ids})
    return out, stats


def pack_sft(examples: list[dict], max_length: int) -> list[dict]:
    """Padding-free packing: concatenate tokenised SFT examples, in order, into rows of at most `max_length` tokens.
    Each row: {"input_ids", "labels", "position_ids" (restart at 0 for every example), "seq_lens" (the examples'
    lengths)}. The label of each example's first token is -100, so no token is trained to predict across an example
    boundary. Feed rows to a model as `model(input_ids=..., position_ids=..., use_cache=False)` with *no* attention
    mask: transformers then builds a block-diagonal causal mask from the position ids (it does not when a KV cache
    is in use, hence use_cache=False); flash-attention varlen takes `cu_seqlens` from SFTCollator. Then no token
    attends across examples either. Examples longer than max_length raise ValueError (tokenise
    with the same max_length first)."""
    rows: list[dict] = []
    cur: dict[str, Any] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}; tokenise with "
                             f"max_length={max_length} first")
        if n == 0:
            continue
        if len(cur["input_ids"]) + n > max_length:
            rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += [IGNORE_INDEX] + list(ex["labels"][1:])
        cur["position_ids"] += list(range(n))
        cur["seq_lens"].append(n)
    if cur["input_ids"]:
        rows.append(cur)
    return rows
