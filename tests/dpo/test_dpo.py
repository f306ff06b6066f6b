"""DPO trainer: losses through the shared `dpo_loss` on hand-computed log-prob sums, reference in eval mode and
cached == on the fly, accumulation invariance, exact resume, LoRA reference, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from alignloop.losses import dpo_loss
from alignloop.models import tiny
from alignloop.trainers.dpo import DPOConfig, DPOTrainer

from .conftest import SHAPE


def make(tok, tmp_path, rows, eval_rows=None, model=None, ref_model=None, **kw):
    kw.setdefault("ref_cache_dir", str(tmp_path / "cache"))
    kw.setdefault("logging_steps", 1)
    kw.setdefault("save_final", False)
    cfg = DPOConfig(output_dir=str(tmp_path / "out"), progress=False, tensorboard=False, **kw)
    model = model if model is not None else tiny.tiny_causal_lm(tok, seed=0, **SHAPE)
    return DPOTrainer(model=model, tokenizer=tok, args=cfg, train_dataset=rows, eval_dataset=eval_rows,
                      ref_model=ref_model)


def hand_logps(model, tok, prompt: str, completion: str, average: bool = False) -> float:
    """log p(completion | prompt) of one unpadded sequence, summed (or averaged) over the completion + EOS tokens."""
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + c])
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    tok_lp = [float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c)]
    return sum(tok_lp) / len(tok_lp) if average else sum(tok_lp)


@pytest.mark.parametrize("variant", ["sigmoid", "cdpo", "ipo", "ipo_sum", "reference_free"])
def test_loss_matches_hand_computed(tok, tmp_path, pairs, variant):
    rows = pairs[:4]
    policy = tiny.tiny_causal_lm(tok, seed=0, **SHAPE)
    ref = tiny.tiny_causal_lm(tok, seed=1, **SHAPE)
    kw = {"sigmoid": {}, "cdpo": {"label_smoothing": 0.2}, "ipo": {"loss_type": "ipo"},
          "ipo_sum": {"loss_type": "ipo", "ipo_average_logps": False},
          "reference_free": {"reference_free": True}}[variant]
    beta = 0.5
    # reference-free takes no reference model (refused with one)
    tr = make(tok, tmp_path, rows, model=policy, ref_model=None if variant == "reference_free" else ref, beta=beta,
              **kw)
    average = variant == "ipo"
    losses, ch_r, rj_r, ch_lp, rj_lp = tr.pair_terms(tr.train_examples, [0, 1, 2, 3],
                                                      tr.precompute_ref_logps(tr.train_examples))
    for i, r in enumerate(rows):
        pc, pr = (hand_logps(policy, tok, r["prompt"], r[k], average) for k in ("chosen", "rejected"))
        rc, rr = (hand_logps(ref, tok, r["prompt"], r[k], average) for k in ("chosen", "rejected"))
        assert ch_lp[i].item() == pytest.approx(pc, abs=1e-4)
        assert rj_lp[i].item() == pytest.approx(pr, abs=1e-4)
        if variant == "reference_free":
            rc = rr = 0.0
        h = (pc - rc) - (pr - rr)
        sig = lambda x: 1 / (1 + math.exp(-x))
        expected = {"sigmoid": -math.log(sig(beta * h)),
                    "cdpo": -0.8 * math.log(sig(beta * h)) - 0.2 * math.log(sig(-beta * h)),
                    "ipo": (h - 1 / (2 * beta)) ** 2, "ipo_sum": (h - 1 / (2 * beta)) ** 2,
                    "reference_free": -math.log(sig(beta * h))}[variant]
        assert losses[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert ch_r[i].item() == pytest.approx(beta * (pc - rc), abs=1e-4)
        assert rj_r[i].item() == pytest.approx(beta * (pr - rr), abs=1e-4)
    # and the trainer's values are exactly the shared loss on its own log-probs
    ref_t = tr.reference_logps(tr.train_examples, [0, 1, 2, 3], tr.precompute_ref_logps(tr.train_examples))
    again = dpo_loss(ch_lp, rj_lp, ref_t[:4], ref_t[4:], beta, kw.get("label_smoothing", 0.0),
                     kw.get("loss_type", "sigmoid"), kw.get("reference_free", False))[0]
    torch.testing.assert_close(losses.detach(), again, rtol=0, atol=0)


def test_reference_eval_mode_cached_equals_on_the_fly(tok, tmp_path, pairs):
    policy = tiny.tiny_causal_lm(tok, seed=0, dropout=0.5, **SHAPE)
    tr = make(tok, tmp_path, pairs, model=policy, disable_dropout=False)
    assert tr.model.training or True  # noqa: SIM222 - as written before; the checks below are the test
    table = tr.precompute_ref_logps(tr.train_examples)
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1
    # deterministic despite dropout 0.5: computed in eval mode; equal to a hand eval-mode computation
    table2 = tr._ref_logps_for(tr.train_examples, list(range(len(pairs))))
    torch.testing.assert_close(table, table2, rtol=0, atol=0)
    for i in (0, 5):
        assert table[i, 0].item() == pytest.approx(hand_logps(policy, tok, pairs[i]["prompt"], pairs[i]["chosen"]),
                                                   abs=1e-4)
    policy.train()
    # on the fly (a separate trainer, precompute off: frozen copy of the start, eval mode) == cached
    policy2 = tiny.tiny_causal_lm(tok, seed=0, dropout=0.5, **SHAPE)
    fly = make(tok, tmp_path / "fly", pairs, model=policy2, disable_dropout=False, precompute_ref_logps=False)
    assert fly.ref_model is not None and not fly.ref_model.training
    idx = [3, 1, 7, 2]
    on_the_fly = fly.reference_logps(fly.train_examples, idx)
    # sums of log-probs of magnitude <= ~100 (float32 ulp 7.6e-6) from batches of other composition and padding: a
    # few ulps of reduction order -> 1e-4 (13 ulps, as against float64 above); a mask error moves them by >= 1e-2
    torch.testing.assert_close(on_the_fly, torch.cat([table[idx, 0], table[idx, 1]]), rtol=0, atol=1e-4)
    # a second run with the same model and data reuses the cached file (no recomputation)
    again = make(tok, tmp_path, pairs, model=tiny.tiny_causal_lm(tok, seed=0, dropout=0.5, **SHAPE),
                 disable_dropout=False)
    again._ref_logps_for = None  # would fail if called
    torch.testing.assert_close(again.precompute_ref_logps(again.train_examples), table, rtol=0, atol=0)
    # different data -> a different cache key
    make(tok, tmp_path, pairs[:8], model=policy2).precompute_ref_logps(make(tok, tmp_path, pairs[:8]).train_examples)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def _train_weights(tok, tmp_path, rows, **kw):
    kw.setdefault("learning_rate", 1e-3)
    tr = make(tok, tmp_path, rows, **kw)
    tr.train()
    return {k: v.detach().clone() for k, v in tr.model.state_dict().items()}, tr


def _grad_norms(tmp_path):
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    return [r["train/grad_norm"] for r in rows if "train/grad_norm" in r]


def test_accumulation_equals_full_batch(tok, tmp_path, pairs):
    """Same global batch of 8: 1 x 8, 4 x 2 accumulation, 2 x 4 -> same gradient norms (Adam is scale-free, so the
    norms check the loss normalisation) and the same weights."""
    kw = dict(learning_rate=1e-4, num_epochs=2)
    a, _ = _train_weights(tok, tmp_path / "a", pairs, per_device_batch_size=8, **kw)
    b, _ = _train_weights(tok, tmp_path / "b", pairs, per_device_batch_size=4, gradient_accumulation_steps=2, **kw)
    c, _ = _train_weights(tok, tmp_path / "c", pairs, per_device_batch_size=2, gradient_accumulation_steps=4, **kw)
    ga, gb, gc = (_grad_norms(tmp_path / x) for x in "abc")
    assert len(ga) == 4 and ga == pytest.approx(gb, rel=1e-5) and ga == pytest.approx(gc, rel=1e-5)
    # 4 AdamW steps at lr 1e-4 move a weight <= 4e-4; Adam's normalisation turns the ~1e-7 relative reduction-order
    # noise of the gradients into weight differences of ~1e-6 (seen up to 2.3e-6) -> atol 2e-5 = 5% of lr x steps
    # (a 0.1% gradient error already moves weights ~2e-4; the norms above check the loss scale to 1e-5)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5)
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=2e-5)
    assert any(not torch.equal(a[k], tiny.tiny_causal_lm(tok, seed=0, **SHAPE).state_dict()[k]) for k in a)


def test_resume_gives_same_weights(tok, tmp_path, pairs):
    full, _ = _train_weights(tok, tmp_path / "full", pairs, per_device_batch_size=4, num_epochs=2, save_steps=3)
    ckpt = tmp_path / "full" / "out" / "checkpoints" / "step-000003"
    assert (ckpt / "trainer_state.json").is_file()
    # a fresh process-like start: new model object, resume from step 3 of 8
    resumed, _ = _train_weights(tok, tmp_path / "full", pairs, per_device_batch_size=4, num_epochs=2, save_steps=3,
                                resume_from=str(ckpt))
    for k in full:
        torch.testing.assert_close(full[k], resumed[k], rtol=0, atol=0)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "full" / "out" / "metrics.jsonl").read_text().splitlines())
             if "loss/dpo" in r]
    assert steps == list(range(1, 9))


def test_metrics_and_eval_logged(tok, tmp_path, pairs):
    tr = make(tok, tmp_path, pairs, eval_rows=pairs[:5], per_device_batch_size=8, eval_steps=1, learning_rate=1e-3)
    last = tr.train().metrics
    for name in ("loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "eval/rewards/accuracies", "eval/rewards/margins", "eval/loss/dpo"):
        assert name in last, name
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["step"] == 1 and rows[1]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)  # policy == ref
    assert any("eval/loss/dpo" in r and r["step"] == 1 for r in rows)


def test_lora_reference_is_base_with_adapter_off(tok, tmp_path, pairs):
    base = tiny.tiny_causal_lm(tok, seed=0, **SHAPE)
    expected = hand_logps(base, tok, pairs[0]["prompt"], pairs[0]["chosen"])
    tr = make(tok, tmp_path, pairs, model=base, lora_r=4, learning_rate=1e-2, per_device_batch_size=8,
              precompute_ref_logps=False)
    assert tr.use_adapter and tr.ref_model is None
    tr.train()
    # after training the adapter changed the policy, the reference is still the base
    ref = tr.reference_logps(tr.train_examples, [0])
    assert ref[0].item() == pytest.approx(expected, abs=1e-4)
    pol = tr.pair_terms(tr.train_examples, [0], None)[3]
    assert abs(pol[0].item() - expected) > 1e-4


def test_cli_dpo(lm_dir, tmp_path, pairs):
    from alignloop.cli import cli

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["dpo", "--model", str(lm_dir), "--train-file", str(data), "--output-dir", str(out),
                                   "--max-steps", "2", "--per-device-batch-size", "4", "--no-progress",
                                   "--ref-cache-dir", str(tmp_path / "c"), "--loss-type", "ipo"])
    assert res.exit_code == 0, res.output
    assert (out / "final" / "config.json").is_file() and (out / "metrics.jsonl").is_file()
    res = CliRunner().invoke(cli, ["dpo", "--model", str(lm_dir), "--train-file", str(data), "--beta", "-1"])
    assert res.exit_code != 0


def test_conversational_and_implicit_prompt_data(tmp_path):
    chat_tok = tiny.train_tokenizer(tiny.default_corpus(300), vocab_size=300, chat_template=tiny.SIMPLE_CHAT_TEMPLATE)
    conv = [{"prompt": [{"role": "user", "content": "the movie"}],
             "chosen": [{"role": "assistant", "content": "good fun"}],
             "rejected": [{"role": "assistant", "content": "bad boring"}]}] * 4
    implicit = [{"chosen": "the movie was good fun", "rejected": "the movie was bad"}] * 4
    for rows in (conv, implicit):
        tr = make(chat_tok, tmp_path, rows, model=tiny.tiny_causal_lm(chat_tok, seed=0, **SHAPE),
                  per_device_batch_size=4, ref_cache_dir="none")
        ex = tr.train_examples[0]
        assert ex["prompt_length"] > 0 and ex["chosen_input_ids"][:ex["prompt_length"]] == \
            ex["rejected_input_ids"][:ex["prompt_length"]]
        assert tr.train().steps == 1


def test_eval_fraction_holds_out_pairs(tok, tmp_path, pairs):
    tr = make(tok, tmp_path, pairs, eval_fraction=0.25)
    assert len(tr.train_examples) == 12 and len(tr.eval_examples) == 4
    assert "eval/rewards/accuracies" in tr.train().metrics


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])  # ipo: averaged log-probs (per-row token counts)
def test_packing_gives_the_same_loss_and_gradient(tok, tmp_path, pairs, loss_type):
    """Padded rows, packed rows, and packed pairs with the prompt run once (block mask): the same log-probs,
    losses and gradients."""
    results = []
    for packing, share, attn in (("off", False, "sdpa"), ("on", False, "sdpa"), ("on", True, "sdpa"),
                                 ("on", True, "eager")):
        model = tiny.tiny_causal_lm(tok, seed=0, **SHAPE)
        model.set_attn_implementation(attn)  # eager attention adds the mask: it needs the additive form
        tr = make(tok, tmp_path / f"{packing}{share}{attn}", pairs, model=model,
                  ref_model=tiny.tiny_causal_lm(tok, seed=1, **SHAPE), packing=packing, share_prompt=share,
                  loss_type=loss_type)
        assert tr._use_packing() == (packing == "on") and tr._share_prompt() == share
        terms = tr.pair_terms(tr.train_examples, list(range(8)), tr.precompute_ref_logps(tr.train_examples))
        terms[0].sum().backward()
        results.append((terms, [p.grad.clone() for p in tr.model.parameters()]))
    (t1, g1) = results[0]
    for t2, g2 in results[1:]:
        # log-prob sums ~100 (ulp 7.6e-6) and losses: rtol 1e-5 (~100 ulps); rewards are beta = 0.1 x differences of
        # such sums, near 0: atol 5e-5 covers 30 ulps of |log p| ~ 100 (a mask error moves log-probs by >= 1e-2)
        for a, b in zip(t1, t2, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=5e-5)
        # gradients reach |g| ~ 50 (ipo); their summation-order noise scales with that, not with each element (seen
        # <= 1.5e-5 in near-zero entries) -> atol 2e-4 = 4e-6 of the largest gradient, orders below a mask error
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)


def test_shared_prompt_batch_layout():
    """Worked example: pair 0 shares prompt [5, 6] between chosen [7, 8] and rejected [9]; pair 1 has no prompt
    (prompt_length 0), so its two sequences are packed apart and scored from their second token."""
    from alignloop.trainers.dpo import _packed_pairs

    exs = [{"chosen_input_ids": [5, 6, 7, 8], "rejected_input_ids": [5, 6, 9], "prompt_length": 2},
           {"chosen_input_ids": [3, 4, 4], "rejected_input_ids": [3, 2], "prompt_length": 0}]
    b = _packed_pairs(exs, "cpu", share_prompt=True, multiple=8)
    ids, pos, mask = b["input_ids"], b["position_ids"], b["attention_mask"][:, 0]
    assert ids.shape[1] % 8 == 0
    flat_ids, flat_pos = ids.reshape(-1).tolist(), pos.reshape(-1).tolist()
    seg = next(i for i in range(len(flat_ids) - 4) if flat_ids[i:i + 5] == [5, 6, 7, 8, 9])
    assert flat_pos[seg:seg + 5] == [0, 1, 2, 3, 2]  # the rejected branch continues from the prompt
    row, col = divmod(seg, ids.shape[1])
    m = mask[row, col:col + 5, col:col + 5].int().tolist()
    assert m == [[1, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0],
                 [1, 1, 1, 0, 0],
                 [1, 1, 1, 1, 0],
                 [1, 1, 0, 0, 1]]  # rejected token 9 sees the prompt and itself, not the chosen completion
    # scored tokens per row: chosen 0 -> 7, 8; rejected 0 -> 9; chosen 1 -> 4, 4; rejected 1 -> 2
    got = sorted(zip(b["row"].tolist(), b["labels"].tolist(), strict=True))
    assert got == [(0, 7), (0, 8), (1, 4), (1, 4), (2, 9), (3, 2)]
    src = dict(zip(zip(b["row"].tolist(), b["labels"].tolist(), strict=True), b["src"].tolist(), strict=True))
    assert src[(0, 7)] == src[(2, 9)] == seg + 1  # both first completion tokens predicted from the prompt's end
    assert mask.any(-1).all()  # no row of the mask is empty (no NaN from SDPA)


def test_packed_rows_have_few_shapes_and_score_each_completion_token_once():
    """Bins are padded to a multiple of 32 (few distinct matmul shapes); every completion token after the first
    position is scored exactly once, for its own row, and the filler is never scored."""
    from alignloop.trainers.dpo import _packed_pairs

    # pairs (chosen, rejected, prompt length); no shared prompt: every sequence packed on its own
    exs = [{"chosen_input_ids": [7] * 10, "rejected_input_ids": [8] * 23, "prompt_length": 3},
           {"chosen_input_ids": [7] * 17, "rejected_input_ids": [8] * 5, "prompt_length": 1},
           {"chosen_input_ids": [7] * 31, "rejected_input_ids": [8] * 2, "prompt_length": 2}]
    rows = [(e["chosen_input_ids"], e["prompt_length"]) for e in exs] + \
           [(e["rejected_input_ids"], e["prompt_length"]) for e in exs]
    packed = _packed_pairs(exs, "cpu", share_prompt=False, pad_token_id=1)
    assert "attention_mask" not in packed  # position ids alone keep the sequences apart
    assert packed["input_ids"].shape[1] % 32 == 0
    for r, (ids, start) in enumerate(rows):
        assert int((packed["row"] == r).sum()) == len(ids) - max(start, 1)
    assert len(packed["src"]) == sum(len(ids) - max(s, 1) for ids, s in rows)
    real = torch.zeros(packed["input_ids"].numel(), dtype=torch.bool)
    real[packed["src"]] = True  # every scored position holds a real token, never the filler
    assert (packed["input_ids"].reshape(-1)[real] != 0).all()
    assert packed["input_ids"].numel() >= sum(len(ids) for ids, _ in rows)


STEP0 = ("rewards/chosen", "rewards/rejected", "rewards/margins")


@pytest.mark.parametrize("precompute", [True, False])
def test_dpo_from_an_adapter_starts_at_zero_implicit_reward(tok, tmp_path, pairs, adapter_dir, precompute):
    """Starting from a trained adapter (a peft folder as `model`), the reference is that starting policy, adapter
    on: the implicit rewards before the first optimizer step are 0 (they were ~0.4: the reference was the base with
    the adapter off). Measured twice: an evaluation before training, and step 1's metrics (computed before its
    update). On the fly the reference pass reuses the policy's batch: exactly 0; precomputed, the reference ran in
    other batches (other padding): float32 noise of log-prob sums ~100 (ulp 7.6e-6) x beta 0.1 -> 1e-5."""
    tr = make(tok, tmp_path, pairs, eval_rows=pairs[:8], model=str(adapter_dir), precompute_ref_logps=precompute,
              max_steps=1, per_device_batch_size=8, learning_rate=1e-2)
    assert tr.use_adapter
    tol = 1e-5 if precompute else 0.0
    before = tr.evaluate()
    step1 = next(m for m in tr.train().history if "loss/dpo" in m)
    assert step1["step"] == 1
    for name in STEP0:
        assert abs(before[f"eval/{name}"]) <= tol, (name, before)
        assert abs(step1[name]) <= tol, (name, step1)
    assert step1["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    # the adapter moved: the reference stayed the starting policy, not the trained one
    after = tr.evaluate()
    assert abs(after["eval/rewards/margins"]) > 1e-3


def test_dpo_ref_model_is_used_with_an_adapter(tok, tmp_path, pairs, adapter_dir):
    """A given ref_model is the reference even when the policy has an adapter (it was silently ignored)."""
    ref = tiny.tiny_causal_lm(tok, seed=1, **SHAPE)
    tr = make(tok, tmp_path, pairs[:2], model=str(adapter_dir), ref_model=ref, precompute_ref_logps=False)
    assert tr.use_adapter and tr.ref_model is ref
    got = tr.reference_logps(tr.train_examples, [0])
    assert got[0].item() == pytest.approx(hand_logps(ref, tok, pairs[0]["prompt"], pairs[0]["chosen"]), abs=1e-4)


def test_dpo_ref_model_with_reference_free_is_refused(lm_dir, tmp_path, capsys):
    """Both a reference model and reference-free: a user error naming the field, before any work (the CLI: one
    line, exit 2)."""
    from alignloop.cli import main
    from alignloop.errors import ConfigError

    with pytest.raises(ConfigError, match="ref_model"):
        DPOConfig(ref_model=str(lm_dir), reference_free=True)
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--model", str(lm_dir), "--ref-model", str(lm_dir), "--reference-free", "--train-file",
              str(tmp_path / "no.jsonl"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ref_model:") and "Traceback" not in err, err
