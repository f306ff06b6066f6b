from __future__ import annotations

import torch

from alignloop.models import last_token_index, load_causal_lm, model_forward, position_ids_from_attention_mask

SEQS = [[5, 9, 12, 7, 30, 41], [8, 3], [17, 22, 40, 11]]


def test_position_ids_count_only_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert position_ids_from_attention_mask(mask).tolist() == [
        [0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    assert position_ids_from_attention_mask(mask.bool()).dtype == torch.long


def test_last_token_index_reads_the_mask_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [4, 2, 4, 0, 1]
    assert last_token_index(mask.bool()).tolist() == [4, 2, 4, 0, 1]


def test_padded_batches_give_unpadded_logits(lm_dir, pad_batch):
    model = load_causal_lm(lm_dir).eval()
    alone = []
    with torch.no_grad():
        for s in SEQS:
            ids = torch.tensor([s])
            alone.append(model_forward(model, ids, torch.ones_like(ids))[0])
        for side in ("left", "right"):
            for pad_id in (1, 0):  # <pad>, and EOS as pad
                ids, mask = pad_batch(SEQS, pad_id, side)
                logits = model_forward(model, ids, mask)
                assert logits.shape == (3, 6, model.config.vocab_size)
                for i in range(len(SEQS)):
                    real = logits[i][mask[i].bool()]
                    torch.testing.assert_close(real, alone[i], atol=1e-5, rtol=1e-5)
        # the test has teeth: without mask-derived position ids, left padding changes the logits
        ids, mask = pad_batch(SEQS, 1, "left")
        naive = model(input_ids=ids, attention_mask=mask).logits
        assert (naive[1][mask[1].bool()] - alone[1]).abs().max() > 1e-3


def test_model_forward_returns_last_hidden_state(lm_dir):
    model = load_causal_lm(lm_dir).eval()
    ids = torch.tensor([SEQS[0]])
    logits, hidden = model_forward(model, ids, torch.ones_like(ids), return_hidden=True)
    assert hidden.shape == (1, 6, model.config.n_embd)
    torch.testing.assert_close(model.lm_head(hidden), logits)
