"""Where each reasoning step of a sampled response ends, in the response's own tokens: what process supervision
(step rewards in PPO / GRPO / RLOO / REINFORCE) needs to put a step's reward on a token.

    ends = step_end_positions(response_ids, tokenizer)          # [index of the token that ends step 1, step 2, ...]
    ends = rollout_step_ends(tokenizer, rollout)                 # one list per row of a Rollout

The steps are those of `alignloop.data.split_steps` on the decoded response (the text a step scorer sees:
`decode_responses`, special tokens skipped): the text split on the separator ("\\n"), empty and whitespace-only
pieces dropped. A step ends at the token that completes its separator (the token holding the separator's last
character; with a BPE tokenizer that is often a merged token such as ".\\n" or "\\n\\n"); a final step without a
separator ends at the last token of the response (the stop token when there is one). Tokens are found by decoding
prefixes of the response, so a character split over several byte-level tokens counts as complete only at the token
that finishes it, and any tokenizer works (no offsets needed).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from alignloop.data import STEP_SEPARATOR, split_steps
from alignloop.rollout.sampler import Rollout


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _step_end_chars(text: str, separator: str) -> list[int | None]:
    """For each step of `split_steps(text)`: the index of its separator's last character, or None for a final step
    without a separator. Each step is found in the text after the previous step's separator (a step never contains
    the separator, so it lies inside one piece)."""
    ends: list[int | None] = []
    cursor = 0
    for step in split_steps(text, separator):
        start = text.find(step, cursor)
        if start < 0:   # split_steps changed the step's text beyond stripping: should not happen
            raise ValueError(f"step {step!r} is not in the response text {text!r}")
        sep = text.find(separator, start + len(step))
        if sep < 0:
            ends.append(None)
            cursor = len(text)
        else:
            ends.append(sep + len(separator) - 1)
            cursor = sep + len(separator)
    return ends


def step_end_positions(response_ids: Sequence[int] | torch.Tensor, tokenizer,
                       separator: str = STEP_SEPARATOR) -> list[int]:
    """The index (into `response_ids`: the response's real tokens, no padding) of the token that ends each step of
    the decoded response, one per step of `split_steps(decode(response_ids), separator)`. See the module docstring.

    Found by binary search on decoded prefixes: the end of a step whose separator ends at character c is the first
    k such that decode(response_ids[:k + 1]) starts with text[:c + 1] (a prefix of a byte-level response decodes to
    the same characters, plus replacement characters for an unfinished one). Cost: O(steps · log tokens) decodes.

    By hand (the characters of "ab\\n\\ncd\\ne", one token each except "\\n\\n" merged and a final "e<eos>"):
    tokens ["a", "b", "\\n\\n", "c", "d\\n", "e", <eos>] -> steps ["ab", "cd", "e"], ends [2, 4, 6]."""
    ids = response_ids.tolist() if isinstance(response_ids, torch.Tensor) else list(response_ids)
    if not ids:
        return []
    text = _decode(tokenizer, ids)
    out = []
    lo = 0
    for c in _step_end_chars(text, separator):
        if c is None:
            out.append(len(ids) - 1)
            continue
        target = text[:c + 1]
        hi = len(ids) - 1            # decode(ids[:hi + 1]) is the whole text: always holds
        while lo < hi:
            mid = (lo + hi) // 2
            if _decode(tokenizer, ids[:mid + 1]).startswith(target):
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out


def rollout_step_ends(tokenizer, rollout: Rollout, separator: str = STEP_SEPARATOR) -> list[list[int]]:
    """`step_end_positions` of each row's real response tokens (the response is right-padded, so the indices are
    the row's response positions)."""
    return [step_end_positions(r[m].tolist(), tokenizer, separator)
            for r, m in zip(rollout.response_ids, rollout.response_mask, strict=True)]
