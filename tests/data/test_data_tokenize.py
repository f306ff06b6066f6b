"""Completion-only labels, truncation policies and their counts, collators (left/right padding), packing."""
import pytest
import torch

from alignloop.data import (
    Pair,
    PreferenceCollator,
    PreferenceGroup,
    SFTCollator,
    pack_sft,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
    truncate,
)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ truncate() on plain id lists

P10 = list(range(100, 110))


def test_truncate_keep_end_cuts_prompt_from_the_left_first():
    # 10 + 5 > 12: prompt keeps its last 7 tokens, the completion is whole
    assert truncate(P10, [[1, 2, 3, 4, 5]], 12, "keep_end") == (P10[3:], [[1, 2, 3, 4, 5]], True)
    # the prompt keeps at least max_length // 2 = 6; then the completion is cut at its end
    assert truncate(P10, [list(range(20))], 12, "keep_end") == (P10[4:], [list(range(6))], True)
    # max_prompt_length sets that floor
    assert truncate(P10, [list(range(20))], 12, "keep_end", max_prompt_length=2) == (P10[8:], [list(range(10))], True)
    # preference: room is set by the longer completion, both share the prompt
    p, (c, r), cut = truncate(P10, [[1, 2], [1, 2, 3, 4]], 12, "keep_end")
    assert p == P10[2:] and c == [1, 2] and r == [1, 2, 3, 4] and cut


def test_truncate_keep_start_drop_and_fits():
    assert truncate(P10, [[1, 2, 3, 4, 5]], 12, "keep_start") == (P10, [[1, 2]], True)
    assert truncate(P10, [[1, 2]], 10, "keep_start") is None  # no completion left -> dropped
    assert truncate(P10, [[1, 2, 3]], 12, "drop") is None
    assert truncate(P10, [[1, 2]], 12, "drop") == (P10, [[1, 2]], False)
    assert truncate(P10, [[1, 2]], None, "keep_end") == (P10, [[1, 2]], False)
    with pytest.raises(ValueError, match="truncation must be one of"):
        truncate(P10, [[1]], 5, "middle")


# ------------------------------------------------------------------ tokenize_sft

def test_sft_labels_mask_prompt_and_eos(plain_tok):
    recs = [{"prompt": "the movie", "completion": " was good"}, {"prompt": "", "completion": "a plot"}]
    ex, stats = tokenize_sft(recs, plain_tok)
    eos = plain_tok.eos_token_id
    p, c = ids(plain_tok, "the movie"), ids(plain_tok, " was good")
    assert ex[0]["input_ids"] == p + c + [eos]
    assert ex[0]["labels"] == [-100] * len(p) + c + [eos] and ex[0]["prompt_length"] == len(p)
    assert ex[1]["labels"] == ex[1]["input_ids"] == ids(plain_tok, "a plot") + [eos]
    assert stats.truncated == 0 and stats.dropped == 0
    ex, _ = tokenize_sft(recs, plain_tok, add_eos=False)
    assert ex[0]["input_ids"] == p + c
    # EOS is not doubled when the completion already ends with it
    ex, _ = tokenize_sft([{"prompt": "a", "completion": " b<|endoftext|>"}], plain_tok)
    assert ex[0]["input_ids"][-2:] != [eos, eos] and ex[0]["input_ids"][-1] == eos
    ex, _ = tokenize_sft([{"prompt": "a", "completion": " b"}], plain_tok, add_bos=True)
    assert ex[0]["input_ids"][0] == plain_tok.bos_token_id and ex[0]["labels"][0] == -100


def test_sft_truncation_counts(plain_tok):
    short = {"prompt": "a", "completion": " b"}
    long_prompt = {"prompt": " ".join(["movie"] * 20), "completion": " good"}
    long_completion = {"prompt": "the movie", "completion": " " + " ".join(["good"] * 20)}
    assert len(ids(plain_tok, long_prompt["prompt"])) >= 16 and len(ids(plain_tok, long_completion["completion"])) > 16
    recs = [short, long_prompt, short, long_completion]
    for policy, kept, truncated, dropped in (("keep_end", 4, 2, 0), ("keep_start", 3, 1, 1), ("drop", 2, 0, 2)):
        ex, stats = tokenize_sft(recs, plain_tok, max_length=16, truncation=policy)
        assert (len(ex), stats.truncated, stats.dropped) == (kept, truncated, dropped), policy
        assert all(len(e["input_ids"]) <= 16 for e in ex)
    eos = plain_tok.eos_token_id
    # keep_end: the long prompt keeps its end, the completion (" good" + EOS) is whole
    ex, _ = tokenize_sft([long_prompt], plain_tok, max_length=16, truncation="keep_end")
    c = ids(plain_tok, " good") + [eos]
    assert ex[0]["input_ids"] == ids(plain_tok, long_prompt["prompt"])[-(16 - len(c)):] + c
    # keep_start: the first 16 tokens; the completion lost its end (and its EOS)
    ex, _ = tokenize_sft([long_completion], plain_tok, max_length=16, truncation="keep_start")
    assert ex[0]["input_ids"] == (ids(plain_tok, "the movie") + ids(plain_tok, long_completion["completion"]))[:16]


def test_preference_tokenization_and_truncation(plain_tok):
    long_prompt = " ".join(["plot"] * 12)
    groups = [PreferenceGroup(long_prompt, [Pair(" good movie", " bad", 1.0)]),
              PreferenceGroup("the", [Pair(" a", " b"), Pair(" a", " c")], 1 / 3)]
    out, stats = tokenize_preferences(groups, plain_tok, max_length=10)
    eos = plain_tok.eos_token_id
    pair = out[0]["pairs"][0]
    c, r = ids(plain_tok, " good movie") + [eos], ids(plain_tok, " bad") + [eos]
    n = pair["prompt_length"]
    assert n == 10 - len(c)  # the prompt was cut from the left to make room for the longer completion
    assert pair["chosen_input_ids"][:n] == pair["rejected_input_ids"][:n] == ids(plain_tok, long_prompt)[-n:]
    assert pair["chosen_input_ids"][n:] == c and pair["rejected_input_ids"][n:] == r
    assert pair["chosen_labels"] == [-100] * n + c and pair["rejected_labels"] == [-100] * n + r
    assert pair["margin"] == 1.0 and pair["tie"] is False
    assert out[1]["pair_weight"] == pytest.approx(1 / 3) and len(out[1]["pairs"]) == 2
    assert stats.truncated == 1 and stats.dropped == 0
    out, stats = tokenize_preferences(groups, plain_tok, max_length=10, truncation="drop")
    assert len(out) == 1 and stats.dropped == 1  # the group whose only pair is dropped disappears


def test_tokenize_prompts_keep_last_tokens(plain_tok):
    out, stats = tokenize_prompts([{"prompt": "the movie was good"}, {"prompt": "a"}], plain_tok, max_length=2)
    assert out[0]["input_ids"] == ids(plain_tok, "the movie was good")[-2:] and stats.truncated == 1


# ------------------------------------------------------------------ collators

EXAMPLES = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]


def test_sft_collator_right_padding():
    b = SFTCollator(pad_token_id=1)(EXAMPLES)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert all(v.dtype == torch.long for v in b.values())


def test_sft_collator_left_padding_and_multiple():
    b = SFTCollator(pad_token_id=1, padding_side="left", pad_to_multiple_of=4)(EXAMPLES)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7], [1, 1, 1, 8]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert b["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]
    assert b["position_ids"].tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
    prompts = SFTCollator(pad_token_id=1, padding_side="left")([{"input_ids": [3, 4]}, {"input_ids": [9]}])
    assert "labels" not in prompts and prompts["input_ids"].tolist() == [[3, 4], [1, 9]]


def _pair(c, r, n_prompt, margin=0.0, tie=False):
    return {"chosen_input_ids": c, "rejected_input_ids": r, "chosen_labels": [-100] * n_prompt + c[n_prompt:],
            "rejected_labels": [-100] * n_prompt + r[n_prompt:], "prompt_length": n_prompt, "margin": margin,
            "tie": tie}


@pytest.mark.parametrize("side", ["right", "left"])
def test_preference_collator_groups(side):
    ranked = {"pairs": [_pair([1, 2, 3], [1, 4], 1), _pair([1, 2, 3], [1, 5, 5, 5], 1),
                        _pair([1, 4], [1, 5, 5, 5], 1, tie=True)], "pair_weight": 1 / 3}
    single = _pair([7, 8], [7, 9], 1, margin=2.0)  # a bare pair is a group of one
    b = PreferenceCollator(pad_token_id=0, padding_side=side)([ranked, single])
    assert b["input_ids"].shape == (8, 4)
    rows = [[t for t, m in zip(r, a, strict=True) if m]
            for r, a in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), strict=True)]
    assert rows == [[1, 2, 3], [1, 2, 3], [1, 4], [7, 8], [1, 4], [1, 5, 5, 5], [1, 5, 5, 5], [7, 9]]
    assert b["margin"].tolist() == [0.0, 0.0, 0.0, 2.0]
    assert b["pair_weight"].tolist() == pytest.approx([1 / 3] * 3 + [1.0])
    assert b["group_index"].tolist() == [0, 0, 0, 1] and b["tie"].tolist() == [False, False, True, False]
    assert b["response_mask"].sum(1).tolist() == [2, 2, 1, 1, 1, 3, 3, 1]
    assert (b["labels"][~b["response_mask"]] == -100).all()
    assert (b["labels"][b["response_mask"]] == b["input_ids"][b["response_mask"]]).all()
    if side == "left":
        assert b["input_ids"][2].tolist() == [0, 0, 1, 4] and b["position_ids"][2].tolist() == [0, 0, 0, 1]
    else:
        assert b["input_ids"][2].tolist() == [1, 4, 0, 0]


# ------------------------------------------------------------------ packing

def test_pack_sft_positions_restart_and_no_cross_example_labels():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]},
                {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}, {"input_ids": [10], "labels": [10]}]
    rows = pack_sft(examples, max_length=6)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert [r["seq_lens"] for r in rows] == [[3, 2], [4, 1]]
    # the first token of every example is -100: nothing is trained to predict across a boundary
    assert [r["labels"] for r in rows] == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]]
    with pytest.raises(ValueError, match="more than max_length=2"):
        pack_sft(examples, max_length=2)
    b = SFTCollator(pad_token_id=0)(rows[:1] + [{"input_ids": [1], "labels": [1], "position_ids": [0],
                                                "seq_lens": [1]}])
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]  # padding is a segment of its own
    assert b["seq_lens"].tolist() == [[3, 2], [1, 0]]
    assert b["cu_seqlens"].tolist() == [0, 3, 5, 6, 10] and b["cu_seqlens"].dtype == torch.int32
    assert b["labels"][1].tolist() == [1, -100, -100, -100, -100]


def test_packed_forward_equals_separate_forwards(plain_tok):
    """With position_ids, no attention mask and no KV cache, transformers attends within each packed example only."""
    from alignloop.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(plain_tok, n_layer=1, n_embd=32, n_head=2).eval()
    recs = [{"prompt": "the movie", "completion": " was good"}, {"prompt": "", "completion": "a boring plot"}]
    examples, _ = tokenize_sft(recs, plain_tok)
    (row,) = pack_sft(examples, max_length=64)
    b = SFTCollator(pad_token_id=plain_tok.pad_token_id)([row])
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            assert torch.allclose(packed[start:start + len(e["input_ids"])], alone, atol=1e-5)
            start += len(e["input_ids"])


def test_preference_batch_logps_same_for_left_and_right_padding(plain_tok):
    """DPO-style completion log-prob sums from the collated batch do not depend on the padding side."""
    from alignloop.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(plain_tok, n_layer=1, n_embd=32, n_head=2).eval()
    groups = [PreferenceGroup("the movie", [Pair(" was good", " was very bad and boring")]),
              PreferenceGroup("a", [Pair(" plot", " story"), Pair(" plot", " ending")], 1 / 3)]
    tokenized, _ = tokenize_preferences(groups, plain_tok)

    def logp_sums(side):
        b = PreferenceCollator(plain_tok.pad_token_id, padding_side=side)(tokenized)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           position_ids=b["position_ids"]).logits[:, :-1]
        labels, mask = b["labels"][:, 1:], b["response_mask"][:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (lp * mask).sum(-1), b

    right, b = logp_sums("right")
    left, _ = logp_sums("left")
    assert torch.allclose(right, left, atol=1e-4)
    # each row's sum covers exactly its completion tokens (EOS included)
    assert b["response_mask"].sum(-1).tolist() == [
        len(p[f"{side}_input_ids"]) - p["prompt_length"] for side in ("chosen", "rejected")
        for g in tokenized for p in g["pairs"]]


def test_ranking_collator_scores_each_completion_once(plain_tok):
    from alignloop.data import RankingCollator, rankings_to_pairs, tokenize_rankings

    comps = [" good", " bad plot", " boring"]
    ranked = PreferenceGroup("the movie", rankings_to_pairs(comps, [2, 1, 3]), 1 / 3, comps, [2, 1, 3])
    plain = PreferenceGroup("a", [Pair(" fun", " awful", 1.0)])
    groups = [ranked, plain]
    out, stats = tokenize_rankings(groups, plain_tok)
    assert [len(g["input_ids"]) for g in out] == [3, 2] and stats.dropped == 0
    assert out[0]["pairs"] == [[1, 0, 0.0, False], [0, 2, 0.0, False], [1, 2, 0.0, False]]
    b = RankingCollator(plain_tok.pad_token_id)(out)
    assert b["input_ids"].shape[0] == 5 and b["group_index"].tolist() == [0, 0, 0, 1, 1]
    assert b["chosen_index"].tolist() == [1, 0, 1, 3] and b["rejected_index"].tolist() == [0, 2, 2, 4]
    assert b["pair_weight"].tolist() == pytest.approx([1 / 3] * 3 + [1.0]) and b["margin"].tolist()[-1] == 1.0
    assert b["order"].tolist() == [[1, 0, 2], [3, 4, 0]] and b["valid"].tolist() == [[True] * 3, [True, True, False]]
    assert b["ranks"].tolist() == [[1, 2, 3], [1, 2, 0]]  # in `order`'s order: the ranking's ranks, ties kept

    # the same pairwise comparisons as the PreferenceCollator batch, with any per-sequence score
    def score(batch):
        return (batch["input_ids"] * batch["response_mask"]).sum(-1).float()

    pref = PreferenceCollator(plain_tok.pad_token_id)(tokenize_preferences(groups, plain_tok)[0])
    p = pref["margin"].shape[0]
    s_pref, s_rank = score(pref), score(b)
    assert torch.equal(s_pref[:p] - s_pref[p:], s_rank[b["chosen_index"]] - s_rank[b["rejected_index"]])
