"""SFT and reward-model trainers: learning, exact resume, accumulation invariance, CLI, HF-loadable output."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_data import write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignloop.trainers.rm import RewardConfig, RewardTrainer, group_losses
from alignloop.trainers.sft import SFTConfig, SFTTrainer, _batch_tensors, token_nll
from alignloop.training import read_metrics

QUIET = dict(progress=False, tensorboard=False, logging_steps=1)


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def assert_same_weights(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= atol, f"max weight difference {worst}"


def heldout_nll(model_path, file):
    from alignloop.data import load_sft, tokenize_sft
    from alignloop.models import load_tokenizer

    tok = load_tokenizer(model_path)
    ex, _ = tokenize_sft(load_sft(file)[0], tok, max_length=64)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    with torch.no_grad():
        nll, mask = token_nll(model, _batch_tensors(ex, tok.pad_token_id, "cpu"))
    return (nll * mask).sum().item() / mask.sum().item()


def test_sft_lowers_heldout_loss(tmp_path, base_model, sft_file, sft_heldout):
    cfg = SFTConfig(output_dir=str(tmp_path / "sft"), learning_rate=5e-3, num_epochs=3, eval_fraction=0.2,
                    per_device_batch_size=16, max_length=64, **QUIET)
    before = heldout_nll(base_model, sft_heldout)
    result = SFTTrainer(model=base_model, args=cfg, train_dataset=sft_file).train()
    after = heldout_nll(result.output_dir, sft_heldout)
    assert after < 0.5 * before, (before, after)
    # the trainer's own held-out metrics, logged per epoch, go down too and perplexity = exp(loss)
    evals = [m for m in read_metrics(tmp_path / "sft") if "eval/loss" in m]
    assert len(evals) == 3 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[-1]["eval/perplexity"] == pytest.approx(torch.tensor(evals[-1]["eval/loss"]).exp().item(), rel=1e-5)
    # plain transformers loads the result
    assert AutoModelForCausalLM.from_pretrained(result.output_dir).config.n_layer == 2


def test_sft_completion_only_loss_masks_prompt(base_model, tiny_tok):
    """Only completion tokens (and EOS) are targets: 'say good:' -> ' good good good' + EOS."""
    from alignloop.data import tokenize_sft

    ex, _ = tokenize_sft([{"prompt": "say good:", "completion": " good good good"}], tiny_tok, max_length=64)
    batch = _batch_tensors(ex, tiny_tok.pad_token_id, "cpu")
    n_prompt = len(tiny_tok("say good:")["input_ids"])
    n_completion = len(tiny_tok(" good good good")["input_ids"]) + 1
    assert batch["loss_mask"].sum().item() == n_completion
    assert not batch["loss_mask"][0, :n_prompt].any()


def test_sft_packing_trains(tmp_path, base_model, sft_file, sft_heldout):
    cfg = SFTConfig(output_dir=str(tmp_path / "packed"), learning_rate=5e-3, num_epochs=3, packing=True,
                    per_device_batch_size=4, max_length=64, **QUIET)
    before = heldout_nll(base_model, sft_heldout)
    result = SFTTrainer(model=base_model, args=cfg, train_dataset=sft_file).train()
    assert heldout_nll(result.output_dir, sft_heldout) < 0.6 * before


def test_sft_packed_row_equals_separate_examples(base_model, tiny_tok):
    """A packed row gives every example the same per-token loss as running it alone (no cross-attention)."""
    from alignloop.data import pack_sft, tokenize_sft

    ex, _ = tokenize_sft([{"prompt": "say good:", "completion": " good good"},
                          {"prompt": "a plot", "completion": " is fun and boring"}], tiny_tok, max_length=64)
    model = AutoModelForCausalLM.from_pretrained(base_model).eval()
    with torch.no_grad():
        sep = [token_nll(model, _batch_tensors([e], tiny_tok.pad_token_id, "cpu")) for e in ex]
        packed_nll, packed_mask = token_nll(model, _batch_tensors(pack_sft(ex, 64), tiny_tok.pad_token_id, "cpu"))
    expected = torch.cat([n[m] for n, m in sep])
    assert torch.allclose(packed_nll[packed_mask], expected, atol=1e-5)


def test_rm_reaches_95_percent(tmp_path, base_model, pref_files):
    train, held = pref_files
    cfg = RewardConfig(output_dir=str(tmp_path / "rm"), learning_rate=1e-3, num_epochs=3, per_device_batch_size=16,
                       max_length=64, **QUIET)
    result = RewardTrainer(model=base_model, args=cfg, train_dataset=train, eval_dataset=held).train()
    assert result.metrics["eval/accuracy"] >= 0.95, result.metrics
    assert result.metrics["eval/margin"] > 1.0
    assert result.metrics["eval/pairs"] == 100
    clf = AutoModelForSequenceClassification.from_pretrained(result.output_dir)
    assert clf.config.num_labels == 1


def test_rm_ranking_groups(tmp_path, base_model):
    """A ranking of K=3 is one batch element with 3 pairs weighted 1/3, scoring 3 distinct sequences."""
    from alignloop.data import RankingCollator, load_preferences, tokenize_rankings
    from alignloop.models import load_tokenizer

    f = write_jsonl(tmp_path / "rank.jsonl", [{"prompt": "p", "completions": [" great fun", " bad", " awful"],
                                               "ranking": [1, 2, 3]}])
    tok = load_tokenizer(base_model)
    groups, _ = tokenize_rankings(load_preferences(f)[0], tok, max_length=32)
    assert len(groups) == 1 and groups[0]["pair_weight"] == pytest.approx(1 / 3)
    assert len(groups[0]["input_ids"]) == 3 and len(groups[0]["pairs"]) == 3
    b = RankingCollator(tok.pad_token_id)(groups)
    assert b["order"].tolist() == [[0, 1, 2]] and b["ranks"].tolist() == [[1, 2, 3]]
    res = RewardTrainer(model=base_model, args=RewardConfig(output_dir=str(tmp_path / "o"), learning_rate=1e-3,
                                                            num_epochs=1, loss="plackett_luce", **QUIET),
                        train_dataset=f).train()
    assert res.steps == 1


def rm_batch(tok, rows, max_length=64):
    """The collated batch `alignloop rm` builds from `rows` (load, tokenise each completion once, collate)."""
    from alignloop.data import RankingCollator, load_preferences, tokenize_rankings

    groups, _ = tokenize_rankings(load_preferences(rows)[0], tok, max_length=max_length)
    return groups, RankingCollator(tok.pad_token_id)(groups)


def rm_first_step(tmp_path, base_model, rows, max_length=64, **cfg):
    """(the first step's logged loss/rm, the trainer's tokenised groups, each group's scores by the starting model)
    for one batch holding every group of `rows`. Scores are computed one sequence at a time before training."""
    import copy

    from alignloop.models import RewardModel, load_tokenizer

    f = write_jsonl(tmp_path / "rows.jsonl", rows)
    tok = load_tokenizer(base_model)
    torch.manual_seed(0)
    model = RewardModel.from_pretrained(base_model)
    before = copy.deepcopy(model).eval()
    groups, _ = rm_batch(tok, rows, max_length)
    with torch.no_grad():
        scores = [[before(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
                   for ids in g["input_ids"]] for g in groups]
    args = RewardConfig(output_dir=str(tmp_path / "rm"), learning_rate=1e-3, num_epochs=1,
                        per_device_batch_size=len(groups), max_length=max_length, **QUIET, **cfg)
    res = RewardTrainer(model=model, args=args, train_dataset=f, tokenizer=tok).train()
    assert res.steps == 1
    return res[0]["loss/rm"], groups, scores


def lse(*xs):
    return torch.logsumexp(torch.tensor(xs, dtype=torch.float64), 0).item()


# a long prompt (49 tokens) and completions of 5, 10 and 17 tokens with EOS: at max_length 40, cutting per pair gave
# the prompt 30 tokens beside the two short ones and 23 beside the long one, so "great fun" and "bad and boring"
# came twice each (5 sequences, ordered by the pairs' win counts)
LONG_PROMPT = "the plot of this film was slow and the acting was dull but the music"
TRUNCATED_RANKING = {"prompt": LONG_PROMPT, "ranking": [1, 2, 3],
                     "completions": [" great fun", " bad and boring", " awful and dull and slow"]}


def test_rm_plackett_luce_scores_each_completion_once_under_truncation(base_model):
    """A K=3 ranking cut to max_length is 3 sequences on one prompt cut (the prompt's last 40 - 17 = 23 tokens),
    and the listwise loss is Plackett-Luce over the ranking: scores [2, 1, 0] -> 0.720868 (by hand in
    test_plackett_luce_by_hand). The old per-pair cut made 5 sequences; each scored as its text, their win-count
    order [a, a, b, b, c] gave 2.856."""
    from alignloop.models import load_tokenizer

    tok = load_tokenizer(base_model)
    (group,), b = rm_batch(tok, [TRUNCATED_RANKING], max_length=40)
    prompt_ids = tok(LONG_PROMPT, add_special_tokens=False)["input_ids"]
    assert len(group["input_ids"]) == 3 and group["prompt_length"] == 23
    assert all(ids[:23] == prompt_ids[-23:] for ids in group["input_ids"])
    losses, _ = group_losses(torch.tensor([2.0, 1.0, 0.0]), b, "plackett_luce", use_margin=True)
    assert losses.tolist() == pytest.approx([0.720868], abs=1e-5)


def test_rm_plackett_luce_loss_is_the_rankings(tmp_path, base_model):
    """The first step's loss is Plackett-Luce of the ranking's three completions, from their scores before
    training: [lse(a, b, c) - a] + [lse(b, c) - b]. (The old path, 5 sequences ordered by win counts, logged 5.42
    here for 1.43.)"""
    loss, groups, ((a, b, c),) = rm_first_step(tmp_path, base_model, [TRUNCATED_RANKING], max_length=40,
                                               loss="plackett_luce")
    assert len(groups[0]["input_ids"]) == 3
    assert loss == pytest.approx(lse(a, b, c) - a + lse(b, c) - b, rel=1e-4)


def test_rm_plackett_luce_ties_are_not_ordered(tmp_path, base_model):
    """Ranking [1, 1, 2]: the tied firsts are left out of each other's denominators, so the first step's loss is
    [lse(a, c) - a] + [lse(b, c) - b] (1.20 here); the old path trained the strict order a > b > c (win counts 1, 1,
    0: 1.45)."""
    rows = [{"prompt": "the film", "completions": [" great fun", " good fun", " awful"], "ranking": [1, 1, 2]}]
    loss, _, ((a, b, c),) = rm_first_step(tmp_path, base_model, rows, loss="plackett_luce")
    assert loss == pytest.approx(lse(a, c) - a + lse(b, c) - b, rel=1e-4)
    assert abs(loss - (lse(a, b, c) - a + lse(b, c) - b)) > 0.1  # the strict order's loss is far off


def test_rm_best_of_k_by_hand_through_the_trainer_path(base_model):
    """`best` rows through the trainer's batch and loss: scores [0, ln 3, 0], best 1 -> -ln(3/5) = 0.510826
    (Ziegler et al.'s softmax over K); a ranking's first place is the pick and the order below it is not used
    (ranking [1, 2, 3] on [ln 3, 0, 0]: the same 0.510826); tied firsts [1, 1, 2] on [1, 1, 0]: one term each with
    the other left out, 2·log(1 + e⁻¹) = 0.626523; a single pair stays Bradley-Terry with its margin:
    -log σ(1 - 0 - 0.5) = 0.474077."""
    import math

    from alignloop.models import load_tokenizer

    tok = load_tokenizer(base_model)
    rows = [{"prompt": "p", "completions": [" bad", " great fun", " awful"], "best": 1},
            {"prompt": "q", "completions": [" great", " bad", " awful"], "ranking": [1, 2, 3]},
            {"prompt": "r", "completions": [" great", " fun", " awful"], "ranking": [1, 1, 2]},
            {"prompt": "s", "chosen": " fun", "rejected": " dull", "margin": 0.5}]
    batches = [rm_batch(tok, rows[:3])[1], rm_batch(tok, rows[3:])[1]]
    scores = [torch.tensor([0.0, math.log(3), 0.0, math.log(3), 0.0, 0.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0])]
    losses = [group_losses(s, b, "best_of_k", use_margin=True)[0] for s, b in zip(scores, batches, strict=True)]
    assert torch.cat(losses).tolist() == pytest.approx([0.510826, 0.510826, 0.626523, 0.474077], abs=1e-5)


def test_rm_best_of_k_trains_on_best_rows(tmp_path, base_model):
    """`loss="best_of_k"` on a best-of-4 row: the first step's loss is -log softmax(scores before training)[best]."""
    rows = [{"prompt": "the film", "completions": [" bad", " dull", " great fun", " awful"], "best": 2}]
    loss, _, (s,) = rm_first_step(tmp_path, base_model, rows, loss="best_of_k")
    assert loss == pytest.approx(lse(*s) - s[2], rel=1e-4)


def test_rm_cli_parses_best_of_k():
    from click.testing import CliRunner

    from alignloop.training.config import make_config_command

    seen = {}
    command = make_config_command("rm", RewardConfig, lambda c: seen.update(cfg=c), "test")
    res = CliRunner().invoke(command, ["--model", "m", "--train-file", "best.jsonl", "--loss", "best_of_k"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].loss == "best_of_k"
    assert CliRunner().invoke(command, ["--loss", "best_of_n"]).exit_code == 2


def test_rm_center_rewards_term_is_mean_of_pair_sums_squared(tmp_path, base_model):
    """center_rewards_coefficient adds coef · mean over the batch's groups of Σ_pairs w (r_c + r_r)² (Eisenstein et
    al. 2023, TRL: mean((r_c + r_r)²) for flat pairs), not coef · mean(r²), which also shrinks every gap. The first
    step's logged loss is checked against scores computed one sequence at a time by the same model before training:
    two rankings of 2 (one pair each, w = 1) and a ranking of 3 (three pairs, w = 1/3), one batch of 3 groups."""
    import copy

    import torch.nn.functional as F

    from alignloop.data import load_preferences, tokenize_preferences
    from alignloop.models import RewardModel, load_tokenizer

    rows = [{"prompt": "a film", "completions": [" bad", " great fun"], "ranking": [2, 1]},
            {"prompt": "the plot", "completions": [" clever", " dull and slow"], "ranking": [1, 2]},
            {"prompt": "p", "completions": [" great fun", " bad", " awful"], "ranking": [1, 2, 3]}]
    f = write_jsonl(tmp_path / "prefs.jsonl", rows)
    tok = load_tokenizer(base_model)
    torch.manual_seed(0)
    model = RewardModel.from_pretrained(base_model)
    before = copy.deepcopy(model).eval()
    groups, _ = tokenize_preferences(load_preferences(f)[0], tok, max_length=32)
    bt, center = 0.0, 0.0
    with torch.no_grad():
        for g in groups:
            w = g["pair_weight"]
            for p in g["pairs"]:
                rc, rr = (before(torch.tensor([p[k]]), torch.ones(1, len(p[k]), dtype=torch.long)).item()
                          for k in ("chosen_input_ids", "rejected_input_ids"))
                bt += w * -F.logsigmoid(torch.tensor(rc - rr - p["margin"])).item()
                center += w * (rc + rr) ** 2
    coef = 0.5
    cfg = RewardConfig(output_dir=str(tmp_path / "rm"), learning_rate=1e-3, num_epochs=1, per_device_batch_size=3,
                       max_length=32, center_rewards_coefficient=coef, **QUIET)
    res = RewardTrainer(model=model, args=cfg, train_dataset=f, tokenizer=tok).train()
    assert res.steps == 1
    assert center > 0.05  # the term is not negligible: the check below can tell the two forms apart
    assert res[0]["loss/rm"] == pytest.approx((bt + coef * center) / 3, rel=1e-4)

@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_batch8_equals_batch4_x2_accumulation(tmp_path, base_model, sft_file, pref_files, kind):
    common = dict(learning_rate=1e-3, max_steps=4, max_length=64, seed=3, **QUIET)
    if kind == "sft":
        run = lambda out, **kw: SFTTrainer(model=base_model, args=SFTConfig(output_dir=str(out), **common, **kw),
                                           train_dataset=sft_file).train()
    else:
        run = lambda out, **kw: RewardTrainer(model=base_model, args=RewardConfig(output_dir=str(out), **common, **kw),
                                              train_dataset=pref_files[0]).train()
    a = run(tmp_path / "b8", per_device_batch_size=8)
    b = run(tmp_path / "b4x2", per_device_batch_size=4, gradient_accumulation_steps=2)
    # 4 AdamW steps at lr 1e-3 move a weight <= 4e-3; Adam's normalisation turns the ~1e-7 relative summation-order
    # noise of the gradients into ~1e-6 (<= 2e-5 in a simulation with 8x the noise seen) -> atol 2e-4 = 5% of
    # lr x steps; a 0.1% gradient error moves weights ~2e-3, a different global batch ~5e-3
    assert_same_weights(a.output_dir, b.output_dir, atol=2e-4)
    c = run(tmp_path / "b4", per_device_batch_size=4)  # a different global batch must give different weights
    with pytest.raises(AssertionError):
        assert_same_weights(a.output_dir, c.output_dir, atol=2e-4)


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_resume_gives_same_weights(tmp_path, dropout_model, sft_file, pref_files, kind):
    """Dropout is on, so a resume that lost the RNG state, the data position, the optimizer moments or the
    schedule would end elsewhere."""
    common = dict(learning_rate=1e-3, num_epochs=2, per_device_batch_size=16, max_length=64, seed=1, save_steps=5,
                  save_total_limit=None, lr_scheduler="cosine", warmup_steps=2, **QUIET)
    Trainer, Config, data = ((SFTTrainer, SFTConfig, sft_file) if kind == "sft"
                             else (RewardTrainer, RewardConfig, pref_files[0]))
    if kind == "rm":
        common["disable_dropout"] = False  # keep the random masks this test is about
    full = Trainer(model=dropout_model, args=Config(output_dir=str(tmp_path / "full"), **common),
                   train_dataset=data).train()
    assert full.steps > 10
    # "interrupted" run: only the checkpoint at step 5 survives; resume into a fresh folder
    ckpt = tmp_path / "full" / "checkpoints" / "step-000005"
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoints" / "step-000005")
    resumed = Trainer(model=dropout_model, args=Config(output_dir=str(tmp_path / "resumed"), resume_from="latest",
                                                       **common), train_dataset=data).train()
    assert resumed.steps == full.steps
    assert_same_weights(full.output_dir, resumed.output_dir, atol=0)
    # and the metrics file reads as one run: each step logged once
    steps = [m["step"] for m in read_metrics(tmp_path / "resumed") if "loss/" + kind in m]
    assert steps == sorted(set(steps)) and steps[-1] == full.steps


def test_cli_yaml_and_flags(tmp_path, base_model, sft_file):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {base_model}\ntrain_file: {sft_file}\nlearning_rate: 0.5\nmax_steps: 2\n"
                   f"output_dir: {tmp_path / 'cli'}\nprogress: false\ntensorboard: false\n")
    out = subprocess.run([sys.executable, "-m", "alignloop.cli", "sft", "--config", str(cfg), "--learning-rate",
                          "0.001", "--per-device-batch-size", "4"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["steps"] == 2 and Path(report["model"]).is_dir()
    saved = (tmp_path / "cli" / "config.yaml").read_text()
    assert "learning_rate: 0.001" in saved and "per_device_batch_size: 4" in saved


@pytest.mark.parametrize("args, message", [
    (["rm", "--model", "/no/such/model", "--train-file", "x.jsonl"], "does not exist"),
    (["sft", "--model", "m", "--max-length", "1"], "max_length"),
    (["rm", "--config", "/no/such.yaml"], "config file not found"),
])
def test_cli_user_errors_exit_2_without_traceback(args, message):
    out = subprocess.run([sys.executable, "-m", "alignloop.cli", *args], capture_output=True, text=True)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr and "Traceback" not in out.stderr


def test_cli_unknown_yaml_field(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: m\nlearning_rat: 0.1\n")
    out = subprocess.run([sys.executable, "-m", "alignloop.cli", "rm", "--config", str(cfg)], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "unknown field 'learning_rat'" in out.stderr and "learning_rate" in out.stderr


TWO_PROC = r'''
import sys, torch
torch.set_num_threads(1)
from alignloop.trainers.{mod} import {T}, {C}
{T}(model=sys.argv[1], args={C}(output_dir=sys.argv[2], learning_rate=1e-3, max_steps=3, per_device_batch_size={b},
    max_length=64, seed=3, progress=False, tensorboard=False), train_dataset=sys.argv[3]).train()
from accelerate import PartialState
print(f"processes={{PartialState().num_processes}}", flush=True)
if torch.distributed.is_initialized():  # exiting with gloo's threads alive can abort a rank
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_two_processes_equal_one(tmp_path, base_model, sft_file, pref_files, kind):
    """accelerate launch, 2 CPU processes (gloo) x batch 4 == 1 process x batch 8."""
    mod, T, C, data = (("sft", "SFTTrainer", "SFTConfig", sft_file) if kind == "sft"
                       else ("rm", "RewardTrainer", "RewardConfig", pref_files[0]))
    for n, b in [(1, 8), (2, 4)]:
        launcher = ["--multi_gpu"] if n > 1 else ["--cpu"]
        script = tmp_path / f"run{n}.py"
        script.write_text(TWO_PROC.format(mod=mod, T=T, C=C, b=b))
        # on a machine without GPUs, accelerate's "multi_gpu" launcher starts torchrun and picks gloo on CPU
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(n),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
               base_model, str(tmp_path / f"out{n}"), data]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"processes={n}" in out.stdout, out.stdout[-2000:]
    # 3 AdamW steps at lr 1e-3 (weights move <= 3e-3); the gloo all-reduce sums the gradient in another order:
    # ~1e-7 relative, ~5e-7 in the weights here -> atol 1.5e-4 = 5% of lr x steps, as in the accumulation test
    assert_same_weights(tmp_path / "out1" / "final", tmp_path / "out2" / "final", atol=1.5e-4)



@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_cli_under_two_processes_prints_one_result_line(tmp_path, base_model, sft_file, pref_files, kind):
    """`accelerate launch` (2 CPU processes) of `alignloop sft|rm`: every process trains, one prints the result."""
    data = sft_file if kind == "sft" else pref_files[0]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "alignloop.cli", kind,
           "--model", base_model, "--train-file", data, "--output-dir", str(tmp_path / "out"), "--max-steps", "2",
           "--per-device-batch-size", "2", "--max-length", "64", "--no-progress", "--no-tensorboard"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{") and '"model"' in line]
    assert len(results) == 1, out.stdout[-2000:]
    assert results[0]["steps"] == 2 and results[0]["model"].endswith("final")

def test_sft_conversational_through_chat_template(tmp_path, base_model):
    """`messages` rows go through the tokenizer's chat template; only the assistant turn is a target."""
    from alignloop.models import load_tokenizer
    from alignloop.models.tiny import SIMPLE_CHAT_TEMPLATE

    tok = load_tokenizer(base_model)
    tok.chat_template = SIMPLE_CHAT_TEMPLATE
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ["good", "bad", "fun", "plot"] * 10]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    from alignloop.data import load_sft

    records, _ = load_sft(f, tokenizer=tok)
    assert records[0]["prompt"] == "<|user|>say good\n<|assistant|>" and records[0]["completion"] == "good good\n"
    res = SFTTrainer(model=base_model, tokenizer=tok, args=SFTConfig(output_dir=str(tmp_path / "o"), learning_rate=1e-2,
                                                                     num_epochs=4, per_device_batch_size=8, **QUIET),
                     train_dataset=f).train()
    losses = [m["loss/sft"] for m in read_metrics(tmp_path / "o") if "loss/sft" in m]
    assert res.steps == 20 and losses[-1] < 0.5 * losses[0]


def test_sft_lora_saves_merged_model(tmp_path, base_model, sft_file, sft_heldout):
    """LoRA trains only the adapter; final/ is the merged model (no LoRA keys, only weight matrices changed),
    loadable by plain transformers, and better on held-out data."""
    res = SFTTrainer(model=base_model, args=SFTConfig(output_dir=str(tmp_path / "lora"), learning_rate=1e-2,
                                                      num_epochs=3, per_device_batch_size=16, lora_r=8, lora_alpha=16,
                                                      max_length=64, **QUIET), train_dataset=sft_file).train()
    merged = weights(res.output_dir)
    assert not any("lora" in k for k in merged)
    base = weights(base_model)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    # LoRA on a 32-wide random GPT-2 learns slowly (the tied output embedding is not adapted): ~5.7 -> ~5.25
    assert heldout_nll(res.output_dir, sft_heldout) < heldout_nll(base_model, sft_heldout) - 0.3
