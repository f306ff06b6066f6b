"""Collators: lists of tokenised examples -> padded torch tensors. `padding_side` is chosen per use: "right" for
training forward passes, "left" for generation (prompts)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alignloop.data.tokenize import IGNORE_INDEX


def pad(seqs: list[list[int]], value: int, padding_side: str = "right", length: int | None = None) -> torch.Tensor:
    """Pad lists of ints to one length (the longest, or `length`) on the left or right -> LongTensor [B, T]."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    t = max((len(s) for s in seqs), default=0) if length is None else length
    out = torch.full((len(seqs), t), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if padding_side == "right":
                out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, t - len(s):] = torch.as_tensor(s, dtype=torch.long)
    return out


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: `attention_mask.cumsum(1) - 1`, clamped at 0 -- the one formula of
    every batch, training forward and sampling step (`alignloop.models` and `alignloop.rollout` use this function).

    Left padding -> pads get 0 and the first real token gets 0; right padding -> pads repeat the last position
    (they are masked, so their value does not matter). [B,T] -> [B,T] long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_batch(seqs: list[list[int]], pad_token_id: int, padding_side: str = "right",
              multiple: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded to the longest (rounded up to `multiple`) -> (input_ids [N,T] long, attention_mask [N,T]
    long, 1 on real tokens)."""
    t = _round_up(max((len(s) for s in seqs), default=0), multiple)
    return pad(seqs, pad_token_id, padding_side, t), pad([[1] * len(s) for s in seqs], 0, padding_side, t)


def _padded_rows(ids: list[list[int]], labels: list[list[int]], pad_token_id: int, padding_side: str,
                 multiple: int | None) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, position_ids, labels and response_mask [N,T] of token rows and their labels."""
    input_ids, attention_mask = pad_batch(ids, pad_token_id, padding_side, multiple)
    labels_t = pad(labels, IGNORE_INDEX, padding_side, input_ids.shape[1])
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": position_ids_from_attention_mask(attention_mask), "labels": labels_t,
            "response_mask": labels_t != IGNORE_INDEX}


@dataclass
class SFTCollator:
    """Batch SFT examples (from `tokenize_sft`) or packed rows (from `pack_sft`).

    Returns input_ids [B,T], attention_mask [B,T] (1 = real token), labels [B,T] (-100 on prompt and padding; only
    when the examples have labels, so prompts from `tokenize_prompts` collate too, left-padded for generation),
    position_ids [B,T] (real tokens count from 0; for packed rows the packed positions, padding its own segment).
    Packed rows add seq_lens [B,S] (example lengths per row, 0-padded) and cu_seqlens [N+1] int32: cumulative
    segment lengths over the flattened [B*T] batch, padding of each row counted as one more segment (for
    flash-attention varlen). For packed rows, call the model with position_ids, use_cache=False and without
    attention_mask (see `pack_sft`): the packed attention_mask only marks padding."""
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        t = _round_up(max(len(e["input_ids"]) for e in examples), self.pad_to_multiple_of)
        ids = [e["input_ids"] for e in examples]
        batch = {
            "input_ids": pad(ids, self.pad_token_id, self.padding_side, t),
            "attention_mask": pad([[1] * len(s) for s in ids], 0, self.padding_side, t),
        }
        if "labels" in examples[0]:
            batch["labels"] = pad([e["labels"] for e in examples], IGNORE_INDEX, self.padding_side, t)
        if "position_ids" not in examples[0]:
            batch["position_ids"] = position_ids_from_attention_mask(batch["attention_mask"])
            return batch
        # packed rows: padding gets positions 0.. (a segment of its own), so it never joins a real example
        positions = []
        for e in examples:
            n_pad = t - len(e["input_ids"])
            padding = list(range(n_pad))
            own = list(e["position_ids"])
            positions.append(own + padding if self.padding_side == "right" else padding + own)
        batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        batch["seq_lens"] = pad([e["seq_lens"] for e in examples], 0, "right")
        lens = []
        for e in examples:
            n_pad = t - len(e["input_ids"])
            segs = list(e["seq_lens"])
            lens += (segs + [n_pad] if self.padding_side == "right" else [n_pad] + segs) if n_pad else segs
        batch["cu_seqlens"] = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return batch


@dataclass
class PreferenceCollator:
    """Batch tokenised preference groups (from `tokenize_preferences`; a bare pair dict counts as a group of one).

    With P = the number of pairs in the batch (all pairs of all groups, group by group):
      input_ids, attention_mask, position_ids, labels: [2P, T] — rows 0..P-1 the chosen sequences, rows P..2P-1 the
        rejected ones (row i and row P+i are one pair); labels are -100 on prompt and padding (completion-only).
      response_mask [2P, T] bool: True on completion tokens (labels != -100).
      margin [P] float; pair_weight [P] float (1/C(K,2) for a ranking of K, 1 for a plain pair);
      group_index [P] long (which group of this batch, 0..G-1, each pair came from); tie [P] bool.
    DPO: per-sequence log-prob sums over response_mask, split [:P] / [P:]. Reward model: score every row at its last
    real token, then loss = sum(pair_weight * bradley_terry_loss(s[:P], s[P:], margin)) / G."""
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, groups: list[dict]) -> dict[str, torch.Tensor]:
        pairs, weights, index = [], [], []
        for g_i, g in enumerate(groups):
            g_pairs = g.get("pairs", [g])
            pairs += g_pairs
            weights += [float(g.get("pair_weight", 1.0))] * len(g_pairs)
            index += [g_i] * len(g_pairs)
        ids = [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
        labels = [p["chosen_labels"] for p in pairs] + [p["rejected_labels"] for p in pairs]
        return {
            **_padded_rows(ids, labels, self.pad_token_id, self.padding_side, self.pad_to_multiple_of),
            "margin": torch.tensor([float(p.get("margin", 0.0)) for p in pairs], dtype=torch.float32),
            "pair_weight": torch.tensor(weights, dtype=torch.float32),
            "group_index": torch.tensor(index, dtype=torch.long),
            "tie": torch.tensor([bool(p.get("tie", False)) for p in pairs], dtype=torch.bool),
        }


@dataclass
class RankingCollator:
    """Batch groups from `tokenize_rankings`: every distinct completion once (N rows), pairs as row indices.

    input_ids, attention_mask, position_ids, labels, response_mask: [N, T] (the completions, group by group);
    group_index [N] long; for the P pairs: chosen_index, rejected_index [P] long (rows of the above), margin [P],
    pair_weight [P], tie [P] bool, pair_group_index [P] long; listwise: order [G, K] long (each group's rows,
    best first by rank; 0 where invalid), ranks [G, K] long (their ranks, equal = tied; 0 where invalid) and valid
    [G, K] bool (False for padding and for groups without a ranking).
    Reward model, pairwise: s = scores(rows) [N]; loss = sum(pair_weight * bradley_terry_loss(s[chosen_index],
    s[rejected_index], margin)) / G — the same as with PreferenceCollator, with each completion scored once.
    Listwise: plackett_luce_loss(s[order], valid, ranks) (ties as its tie model says)."""
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, groups: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, group_index = [], [], []
        chosen, rejected, margin, weight, tie, pair_group = [], [], [], [], [], []
        k_max = max(len(g["input_ids"]) for g in groups)
        order = torch.zeros(len(groups), k_max, dtype=torch.long)
        ranks = torch.zeros(len(groups), k_max, dtype=torch.long)
        valid = torch.zeros(len(groups), k_max, dtype=torch.bool)
        for g_i, g in enumerate(groups):
            start = len(ids)
            ids += g["input_ids"]
            labels += g["labels"]
            group_index += [g_i] * len(g["input_ids"])
            for i, j, m, t in g["pairs"]:
                chosen.append(start + i)
                rejected.append(start + j)
                margin.append(float(m))
                tie.append(bool(t))
                weight.append(float(g.get("pair_weight", 1.0)))
                pair_group.append(g_i)
            if g.get("ranking") is not None:
                best_first = sorted(range(len(g["ranking"])), key=lambda k: g["ranking"][k])
                order[g_i, :len(best_first)] = torch.tensor(best_first) + start
                ranks[g_i, :len(best_first)] = torch.tensor([g["ranking"][k] for k in best_first])
                valid[g_i, :len(best_first)] = True
        return {
            **_padded_rows(ids, labels, self.pad_token_id, self.padding_side, self.pad_to_multiple_of),
            "group_index": torch.tensor(group_index, dtype=torch.long),
            "chosen_index": torch.tensor(chosen, dtype=torch.long),
            "rejected_index": torch.tensor(rejected, dtype=torch.long),
            "margin": torch.tensor(margin, dtype=torch.float32),
            "pair_weight": torch.tensor(weight, dtype=torch.float32),
            "tie": torch.tensor(tie, dtype=torch.bool),
            "pair_group_index": torch.tensor(pair_group, dtype=torch.long),
            "order": order,
            "ranks": ranks,
            "valid": valid,
        }
