"""Property tests: mask helpers against plain loops; scores invariant to any amount of left/right padding."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.models import RewardModel, last_token_index, position_ids_from_attention_mask

masks = st.lists(st.lists(st.integers(0, 1), min_size=1, max_size=12), min_size=1, max_size=6).map(
    lambda rows: [r + [0] * (12 - len(r)) for r in rows])


@given(masks)
def test_mask_helpers_match_loops(rows):
    mask = torch.tensor(rows)
    pos = position_ids_from_attention_mask(mask).tolist()
    last = last_token_index(mask).tolist()
    for r, row in enumerate(rows):
        count = 0
        for t, m in enumerate(row):
            count += m
            assert pos[r][t] == max(count - 1, 0)
        real = [t for t, m in enumerate(row) if m]
        assert last[r] == (real[-1] if real else 0)


_RM = {}


def _rm(path):
    if path not in _RM:
        _RM[path] = RewardModel.from_pretrained(path).eval()
    return _RM[path]


@settings(max_examples=15, deadline=None)
@given(seq=st.lists(st.integers(0, 299), min_size=1, max_size=10), left=st.integers(0, 5), right=st.integers(0, 5),
       pad_id=st.sampled_from([0, 1]))
def test_reward_score_invariant_to_padding(reward_dir, seq, left, right, pad_id):
    rm = _rm(str(reward_dir))
    ids = torch.tensor([[pad_id] * left + seq + [pad_id] * right])
    mask = torch.tensor([[0] * left + [1] * len(seq) + [0] * right])
    alone = torch.tensor([seq])
    with torch.no_grad():
        torch.testing.assert_close(rm(ids, mask), rm(alone, torch.ones_like(alone)), atol=1e-5, rtol=1e-5)
