"""KTO trainer on tiny local models: the loss through the shared `kto_loss` on hand-computed log-prob sums and
reference point, mismatched pairs, accumulation invariance, learning, metrics, the CLI and bad input."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from trainer_data import preference_rows, write_jsonl

from alignloop.data import DataError
from alignloop.errors import ConfigError
from alignloop.losses import kto_loss
from alignloop.models import tiny
from alignloop.models.logps import completion_logps
from alignloop.trainers.kto import KTOConfig, KTOTrainer, kl_partners

SHAPE = dict(n_layer=2, n_embd=32, n_head=2)


def unpaired(n: int, seed: int) -> list[dict]:
    """n preference rows split into 2n unpaired rows: the chosen completion (with 'great') desirable, the rejected
    one undesirable; desirable rows first."""
    pairs = preference_rows(n, seed)
    return ([{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in pairs]
            + [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in pairs])


def make(tok, tmp_path, rows, eval_rows=None, model=None, ref_model=None, **kw):
    kw.setdefault("logging_steps", 1)
    kw.setdefault("save_final", False)
    kw.setdefault("per_device_batch_size", 4)
    cfg = KTOConfig(output_dir=str(tmp_path / "out"), progress=False, tensorboard=False, **kw)
    model = model if model is not None else tiny.tiny_causal_lm(tok, seed=0, **SHAPE)
    return KTOTrainer(model=model, tokenizer=tok, args=cfg, train_dataset=rows, eval_dataset=eval_rows,
                      ref_model=ref_model)


def hand_logps(model, tok, prompt: str, completion: str) -> float:
    """log p(completion + EOS | prompt) of one unpadded sequence in float64."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0, :-1].double(), -1)
    return sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))


def metrics(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def test_loss_and_reference_point_match_hand_computed(tiny_tok, tmp_path):
    """Four rows (two up, two down), global batch 4: the mismatched pairs are the batch rotated by one
    (`kl_partners`); z₀ = max(0, mean of policy − reference log-probs of (prompt_i, completion_partner(i))); each
    loss is TRL's formula on unpadded float64 log-probs."""
    rows = unpaired(2, 0)
    rows = [rows[0], rows[1], rows[2], rows[3]]      # up, up, down, down: the examples keep this order
    policy = tiny.tiny_causal_lm(tiny_tok, seed=0, **SHAPE)
    ref = tiny.tiny_causal_lm(tiny_tok, seed=1, **SHAPE)
    beta, wd, wu = 0.5, 1.0, 1.3
    tr = make(tiny_tok, tmp_path, rows, model=policy, ref_model=ref, beta=beta, desirable_weight=wd,
              undesirable_weight=wu)
    assert [ex["label"] for ex in tr.train_examples] == [True, True, False, False]
    partner = kl_partners(4, 4, seed=0)
    assert sorted(partner) == [0, 1, 2, 3] and all(partner[i] != i for i in range(4))
    idx = [0, 1, 2, 3]
    table = tr.precompute_ref_logps(tr.train_examples)
    z0, raw = tr.reference_point(tr.mismatched_logps(tr.train_examples, idx), table[idx, 1])
    losses, rewards, logps, desirable = tr.row_terms(tr.train_examples, idx, z0, table[idx, 0])

    kl = [hand_logps(policy, tiny_tok, rows[i]["prompt"], rows[partner[i]]["completion"])
          - hand_logps(ref, tiny_tok, rows[i]["prompt"], rows[partner[i]]["completion"]) for i in idx]
    # log-prob sums ~ 50 (float32 ulp 3.8e-6) from padded batches: 1e-4 is ~25 ulps; a mask error moves them >= 1e-2
    assert raw == pytest.approx(sum(kl) / 4, abs=1e-4)
    assert float(z0) == pytest.approx(max(0.0, sum(kl) / 4), abs=1e-4)
    sig = lambda x: 1 / (1 + math.exp(-x))
    for i, r in enumerate(rows):
        pol, rf = hand_logps(policy, tiny_tok, r["prompt"], r["completion"]), \
            hand_logps(ref, tiny_tok, r["prompt"], r["completion"])
        assert logps[i].item() == pytest.approx(pol, abs=1e-4)
        assert table[i, 0].item() == pytest.approx(rf, abs=1e-4)
        h = pol - rf
        zz = max(0.0, sum(kl) / 4)
        want = wd * (1 - sig(beta * (h - zz))) if r["label"] else wu * (1 - sig(beta * (zz - h)))
        assert losses[i].item() == pytest.approx(want, abs=1e-4)
        assert rewards[i].item() == pytest.approx(beta * h, abs=1e-4)
    # and exactly the shared loss on the trainer's own log-probs
    again = kto_loss(logps, table[idx, 0], desirable, z0, beta, wd, wu)[0]
    torch.testing.assert_close(losses.detach(), again, rtol=0, atol=0)


def test_completion_logps_equals_the_full_forward(tiny_tok):
    """The LM head at completion positions only == log_softmax of the full logits, per row, padded rows included."""
    model = tiny.tiny_causal_lm(tiny_tok, seed=0, **SHAPE).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    resp = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
             "response_mask": resp}
    with torch.no_grad():
        got = completion_logps(model, batch)
        logp = torch.log_softmax(model(ids, attention_mask=mask).logits.double(), -1)
    want = [sum(float(logp[0, t - 1, ids[0, t]]) for t in (2, 3, 4)), sum(float(logp[1, t - 1, ids[1, t]])
                                                                           for t in (1, 2))]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    with torch.no_grad():
        assert completion_logps(model, batch, average=True).tolist() == pytest.approx([want[0] / 3, want[1] / 2],
                                                                                      abs=1e-4)


def test_mismatched_pairs_rotate_each_global_batch():
    """Epoch 0's global batches rotated by one: every example's partner is another example of its own batch; a
    last batch of one takes the completion of the example before it (in epoch order)."""
    from alignloop.training import plan_epoch

    partner = kl_partners(9, 4, seed=3)
    batches = plan_epoch(9, 4, 3, 0)
    assert [len(b) for b in batches] == [4, 4, 1]
    for b in batches[:2]:
        assert [partner[i] for i in b] == [b[-1]] + b[:-1]     # TRL's rotation: (x_1, y_n), (x_2, y_1), ...
    assert partner[batches[2][0]] == batches[1][-1]


def _train(tok, tmp_path, rows, **kw):
    tr = make(tok, tmp_path, rows, **kw)
    tr.train()
    return {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


def test_accumulation_equals_full_batch(tiny_tok, tmp_path):
    """Global batch 8: 1 x 8 == 4 x 2 accumulation == 2 x 4: the reference point is the global batch's (TRL's is
    each micro-batch's), so gradient norms and weights agree."""
    rows = unpaired(8, 1)
    kw = dict(learning_rate=3e-3, num_epochs=2)   # z₀ > 0 from step 3 (the mismatched log-ratio ~1.2)
    a = _train(tiny_tok, tmp_path / "a", rows, per_device_batch_size=8, **kw)
    b = _train(tiny_tok, tmp_path / "b", rows, per_device_batch_size=4, gradient_accumulation_steps=2, **kw)
    c = _train(tiny_tok, tmp_path / "c", rows, per_device_batch_size=2, gradient_accumulation_steps=4, **kw)
    norms = [[r["train/grad_norm"] for r in metrics(tmp_path / x) if "train/grad_norm" in r] for x in "abc"]
    z0s = [[r["kl/z0"] for r in metrics(tmp_path / x) if "kl/z0" in r] for x in "abc"]
    assert len(norms[0]) == 4 and norms[0] == pytest.approx(norms[1], rel=1e-5) \
        and norms[0] == pytest.approx(norms[2], rel=1e-5)
    assert max(z0s[0]) > 0 and z0s[0] == pytest.approx(z0s[1], abs=1e-5) and z0s[0] == pytest.approx(z0s[2], abs=1e-5)
    # 4 AdamW steps at lr 3e-3 move a weight <= 1.2e-2; reduction-order noise of the gradients (~1e-7 relative)
    # moves the weights ~1e-5 through Adam's normalisation -> atol 6e-4 = 5% of lr x steps; a 0.1% gradient error
    # moves them ~6e-3
    start = tiny.tiny_causal_lm(tiny_tok, seed=0, **SHAPE).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=6e-4)
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=6e-4)
    assert any(not torch.equal(a[k], start[k]) for k in a)


def test_reference_on_the_fly_equals_precomputed(tiny_tok, tmp_path):
    """precompute_ref_logps False (a frozen copy of the start, computed each step) trains exactly as the table."""
    rows = unpaired(4, 2)
    a = _train(tiny_tok, tmp_path / "a", rows, learning_rate=1e-3, max_steps=3)
    b = _train(tiny_tok, tmp_path / "b", rows, learning_rate=1e-3, max_steps=3, precompute_ref_logps=False)
    la, lb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for key in ("loss/kto", "kl/z0", "rewards/chosen"):
        assert [r[key] for r in la if key in r] == pytest.approx([r[key] for r in lb if key in r], abs=1e-5)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_learns_loss_falls_and_desirable_rewards_rise(tiny_tok, tmp_path):
    """Desirable completions contain 'great', undesirable ones never: the loss falls, the desirable rows' implicit
    reward rises above the undesirable ones'. The first step's loss is exactly 1/2 (policy == reference, z₀ = 0).
    Metrics as TRL's, and held-out ones."""
    tr = make(tiny_tok, tmp_path, unpaired(48, 3), eval_rows=unpaired(8, 4), learning_rate=2e-3, num_epochs=2,
              per_device_batch_size=8, logging_steps=3)
    last = tr.train().metrics
    for name in ("loss/kto", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                 "logps/rejected", "kl/z0", "kl/estimate", "train/grad_norm", "perf/examples_per_sec",
                 "eval/loss/kto", "eval/rewards/margins", "eval/kl/z0"):
        assert name in last, name
    rows = [r for r in metrics(tmp_path) if "loss/kto" in r]
    first, final = rows[0], rows[-1]
    assert final["loss/kto"] < first["loss/kto"] - 0.03
    assert final["rewards/chosen"] > first["rewards/chosen"] + 0.1 and final["rewards/margins"] > 0.2
    assert last["eval/rewards/margins"] > 0
    # the very first step, alone: policy == reference -> every log-ratio 0, z₀ = 0, loss 1 - σ(0) = 1/2
    one = make(tiny_tok, tmp_path / "one", unpaired(4, 3), max_steps=1)
    one.train()
    step1 = next(r for r in metrics(tmp_path / "one") if "loss/kto" in r)
    assert step1["loss/kto"] == pytest.approx(0.5, abs=1e-6) and step1["kl/z0"] == pytest.approx(0.0, abs=1e-6)
    assert step1["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_conversational_and_preference_rows(tmp_path):
    """Conversational unpaired rows are chat-templated; preference pairs are unpaired (chosen up, rejected down)."""
    chat_tok = tiny.train_tokenizer(tiny.default_corpus(300), vocab_size=300, chat_template=tiny.SIMPLE_CHAT_TEMPLATE)
    conv = [{"prompt": [{"role": "user", "content": "the movie"}],
             "completion": [{"role": "assistant", "content": "good fun" if i % 2 else "bad boring"}],
             "label": bool(i % 2)} for i in range(4)]
    tr = make(chat_tok, tmp_path / "c", conv, model=tiny.tiny_causal_lm(chat_tok, seed=0, **SHAPE))
    ex = tr.train_examples[0]
    assert ex["prompt_length"] > 0 and ex["kl_input_ids"][:ex["prompt_length"]] == ex["input_ids"][:ex["prompt_length"]]
    assert tr.train().steps == 1
    pairs = [{"prompt": "the film", "chosen": " good fun", "rejected": " bad"}] * 3
    tr = make(chat_tok, tmp_path / "p", pairs, model=tiny.tiny_causal_lm(chat_tok, seed=0, **SHAPE))
    assert [ex["label"] for ex in tr.train_examples] == [True] * 3 + [False] * 3


def test_bad_input_names_file_line_and_field(tiny_tok, tmp_path):
    good = {"prompt": "a", "completion": " b", "label": True}
    for rows, says in ((([good, {"prompt": "a", "completion": " b"}]), "line 2, field 'label'"),
                       (([good, {"prompt": "a", "completion": " b", "label": "maybe"}]), "line 2, field 'label'"),
                       (([{"prompt": "a", "completion": 3, "label": True}]), "line 1, field 'completion'")):
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(DataError, match=says) as e:
            make(tiny_tok, tmp_path, path)
        assert "bad.jsonl" in str(e.value)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": " b"}] * 2)
    with pytest.raises(DataError, match="expected unpaired"):
        make(tiny_tok, tmp_path, sft)
    with pytest.raises(ConfigError, match=">= 2"):
        make(tiny_tok, tmp_path, unpaired(2, 0), per_device_batch_size=1)
    with pytest.raises(ConfigError, match="at least 2 training rows"):
        make(tiny_tok, tmp_path, [good])
    for bad in (dict(beta=0), dict(desirable_weight=-1), dict(desirable_weight=0, undesirable_weight=0)):
        with pytest.raises(ConfigError):
            KTOConfig(**bad)


def test_cli_kto(base_model, tmp_path):
    """`alignloop kto --config x.yaml --beta 0.3`: the YAML, the flags over it, one JSON line; errors exit 2."""
    from alignloop.cli import cli, main
    from alignloop.trainers.kto import KTOConfig as Cfg
    from alignloop.training import make_config_command

    data = write_jsonl(tmp_path / "thumbs.jsonl", unpaired(4, 0))
    out = tmp_path / "out"
    cfg_file = tmp_path / "kto.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": base_model, "train_file": data, "output_dir": str(out),
                                        "beta": 0.2, "max_steps": 2, "per_device_batch_size": 4,
                                        "progress": False, "tensorboard": False}))
    seen = {}
    parse = make_config_command("kto", Cfg, lambda c: seen.update(cfg=c), "parse only")
    res = CliRunner().invoke(parse, ["--config", str(cfg_file), "--beta", "0.3", "--undesirable-weight", "1.2",
                                     "--no-precompute-ref-logps"])
    assert res.exit_code == 0, res.output
    c = seen["cfg"]
    assert (c.beta, c.undesirable_weight, c.max_steps, c.precompute_ref_logps, c.train_file) == (0.3, 1.2, 2,
                                                                                               False, data)
    res = CliRunner().invoke(cli, ["kto", "--config", str(cfg_file), "--beta", "0.3", "--desirable-weight", "1.1"])
    assert res.exit_code == 0, res.output
    text = [x for x in res.output.splitlines() if '{"' in x][-1]        # a progress bar may share the line
    line = json.loads(text[text.index('{"'):])
    assert line["steps"] == 2 and "loss/kto" in line and (out / "final" / "config.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["beta"] == 0.3
    assert "kto" in CliRunner().invoke(cli, ["--help"]).output
    for argv in (["kto", "--config", str(cfg_file), "--beta", "-1"],
                 ["kto", "--model", base_model, "--train-file", str(tmp_path / "missing.jsonl")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


@pytest.mark.parametrize("precompute", [True, False])
def test_from_an_adapter_starts_at_zero_implicit_reward(base_model, tiny_tok, tmp_path, precompute):
    """Starting from a trained adapter (a peft folder as `model`), the reference is that starting policy, adapter
    on: step 1's rewards and reference point (computed before its update) are 0, not the distance to the base. The
    shared final save writes the adapter too. Precomputed, the reference ran in other batches: float32 noise of
    log-prob sums ~100 (ulp 7.6e-6) x beta 0.1 -> 1e-5; on the fly it reuses the policy's rows: exactly 0."""
    from transformers import AutoModelForCausalLM

    from alignloop.models import LoraOptions, apply_lora

    start = apply_lora(AutoModelForCausalLM.from_pretrained(base_model), LoraOptions(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in start.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    start.save_pretrained(tmp_path / "start")
    tiny_tok.save_pretrained(tmp_path / "start")
    tr = make(tiny_tok, tmp_path, unpaired(4, 0), model=str(tmp_path / "start"), precompute_ref_logps=precompute,
              max_steps=1, per_device_batch_size=8, save_final=True)
    step1 = next(m for m in tr.train().history if "loss/kto" in m)
    tol = 1e-5 if precompute else 0.0
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl/estimate"):
        assert abs(step1[name]) <= tol, (name, {k: v for k, v in step1.items() if "/" in k})
    assert (tmp_path / "out" / "final" / "config.json").is_file()
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


DIST_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {here!r})
from test_kto import SHAPE, unpaired
from alignloop.models import tiny
from alignloop.trainers.kto import KTOConfig, KTOTrainer
tok = tiny.train_tokenizer(tiny.default_corpus(400), vocab_size=300)
args = KTOConfig(output_dir={out!r}, learning_rate=3e-3, per_device_batch_size={per_device},
                 gradient_accumulation_steps={accum}, num_epochs=2,
                 progress=False, tensorboard=False, save_final=False, logging_steps=1, eval_fraction=0.2,
                 eval_batch_size={eval_batch})
tr = KTOTrainer(model=tiny.tiny_causal_lm(tok, seed=0, **SHAPE), tokenizer=tok, args=args,
                train_dataset=unpaired({n}, 1))
tr.train()
from torch.distributed.tensor import DTensor
print(f"world={{tr.world}} sharded={{sum(isinstance(p, DTensor) for p in tr.policy.parameters())}}")
state = {{k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tr.model.state_dict().items()}}
if tr.accelerator.is_main_process:
    torch.save(state, {out!r} + "/weights.pt")
if torch.distributed.is_initialized():  # exiting with gloo's threads alive can abort a rank
    tr.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("n, one, two, fsdp", [(10, (8, 1), (4, 1), False), (8, (4, 2), (2, 2), False),
                                               (8, (4, 2), (2, 2), True)], ids=["even", "short-last", "fsdp2"])
def test_two_processes_equal_one(tmp_path, n, one, two, fsdp):
    """1 process x 8 == 2 processes x 4 (gloo on CPU): the reference point reduced over the processes, the shares of
    the reference precomputation gathered, the gradients averaged by DDP; held-out metrics too."""
    here, root = str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])
    logs, weights = {}, {}
    # short-last: 13 training rows (16, 3 held out), global batch 8: the last batch of 5 is split 3 / 2 over the
    # processes, micro-batches of 2: process 1 runs one of weight 0 so that both take part in DDP's reduction; the 3
    # held-out rows evaluated one by one (2 / 1 forwards). fsdp2: accelerate's FSDP2 (examples/accelerate/fsdp2.yaml)
    for name, nproc, (per_device, accum) in (("one", 1, one), ("two", 2, two)):
        out = tmp_path / name
        out.mkdir()
        script = tmp_path / f"{name}.py"
        script.write_text(DIST_SCRIPT.format(here=here, out=str(out), per_device=per_device, accum=accum, n=n,
                                             eval_batch=1 if n == 8 else 32))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root, "ACCELERATE_USE_CPU": "true"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(script)]
        if fsdp and nproc > 1:
            env.pop("ACCELERATE_USE_CPU")
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   root + "/examples/accelerate/fsdp2.yaml", "--num_processes", str(nproc), str(script)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"world={nproc}" in proc.stdout, proc.stdout
        if fsdp and nproc > 1:
            assert "sharded=0" not in proc.stdout, proc.stdout
        weights[name] = torch.load(out / "weights.pt")
        logs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/grad_norm", "kl/z0", "loss/kto", "eval/loss/kto", "eval/kl/z0"):
        one, two = ([r[key] for r in logs[x] if key in r] for x in ("one", "two"))
        assert one and one == pytest.approx(two, rel=1e-5, abs=1e-5), key
    assert max(r["kl/z0"] for r in logs["one"] if "kl/z0" in r) > 0
    # 4 AdamW steps at lr 3e-3 (weights move <= 1.2e-2); the all-reduce sums in another order (~1e-7 relative),
    # seen as 3.3e-6 in the weights -> atol 6e-4 = 5% of lr x steps (a 0.1% gradient error moves them ~6e-3)
    for k, v in weights["one"].items():
        torch.testing.assert_close(v, weights["two"][k], rtol=0, atol=6e-4)
