"""`alignloop demo --task arithmetic`: process reward models against outcome reward models and majority voting on a
toy multi-step arithmetic task (`alignloop.demo.arithmetic`), offline on CPU.

Stages (each resumable through `alignloop.pipeline.RunFolder`; the folder names below are the stage names):
  data      problems, disjoint by expression: pretraining, labeling, RL and test problems; the pretraining
            solutions, half of them correct and half with step errors injected at rate `error_rate` per step
  base      a tokenizer trained locally (byte-level BPE, digits one token each) and a small GPT-2 trained from scratch
            on the solutions (loss on the solution, not on the problem): it makes step errors, as trained
  samples   `label_samples` solutions per labeling problem and `test_samples` (64) per test problem from it
  labels    Math-Shepherd labels of every labeling solution (`alignloop.recipes.math_shepherd`: `rollouts` rollouts
            from each step prefix; hard label = any reaches the right answer), and simulated step labelers
            (`arithmetic.simulate_step_labels`: careful ones and a careless one, first-error shortcut) on the first
            `human_solutions` solutions, merged by majority per step
  prm_auto, prm_human, orm   `alignloop prm`'s trainer (PRMTrainer) from the base model: a PRM on the automatic
            labels, a PRM on the simulated labelers' labels, and an ORM: the outcome view of the automatic rows
            (the same solutions, only the final step labelled with whether the final answer is right)
  eval      every test candidate scored by the three models and, as a diagnostic trained on no label, by the base
            model's own probability of each step (`likelihood_step_scores`); their step AUC, the PRMs' per-step and
            first-error accuracy and the outcome accuracy against the gold verifiers; solve rate of best-of-N for
            N = 1, 2, 4, ..., 64 by PRM (min, prod and last step), ORM, majority voting, PRM-weighted voting, the
            base model's likelihood and the oracle (pass@N), from the pool of 64 without bias
            (`alignloop.recipes.prm_search`); PRM-guided step-level beam search
  rl        PPO and RLOO from the base model against the ORM (outcome rewards) and against the PRM (process rewards
            on the step-end tokens, `reward_granularity="process"`; PPO with `step_reward="delta"`: each step paid the
            drop of the PRM's running min); solve rate before and after
  report    report.md, results.json (the figures), best_of_n.json / best_of_n.md, plots/solve_rate_vs_n.png

Nothing is tuned on the test problems: sizes and settings are fixed here, the aggregation reported first ("min",
Math-Shepherd's) is chosen before any run, and the others are shown beside it.

Why a PRM can beat an ORM (Lightman et al. 2023): the ORM learns from one noisy bit per solution (a final answer
can be right after a wrong step: the `recovered` errors and, mod 10, lucky wraps, so outcome labels reward some bad
processes, and a wrong answer does not say which step failed), while the PRM is told which step went wrong.
Majority voting suffers from systematic errors (the wrong operation gives the same wrong answer every time).
Whether it does on a given run is measured, not assumed: the report shows the curves as they come out. Measured
(see the README): the base model's own likelihood separates its right and wrong steps almost perfectly, but a PRM
or ORM fine-tuned from this 4-layer model on a few thousand labelled solutions learns only a weak verifier (the
comparison of a written digit with the one the model computes must be learnt from the labels), which best-of-N
over-optimises at large N.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignloop.data import join_steps, pad_batch, read_rows, split_steps, tokenize_steps, write_rows
from alignloop.demo import arithmetic as ar
from alignloop.errors import UserError
from alignloop.evaluation import load_policy
from alignloop.models import model_forward
from alignloop.models.tiny import EOS, PAD, UNK, build_tiny_checkpoint
from alignloop.pipeline import RunFolder
from alignloop.pipeline.report import fmt, table
from alignloop.recipes import prm_search as ps
from alignloop.recipes.math_shepherd import math_shepherd_labels, policy_continuer
from alignloop.rollout import SamplingParams, sample_completions
from alignloop.scoring import aggregate_step_scores, load_scorer
from alignloop.trainers.grpo import GRPOTrainer, RLOOConfig
from alignloop.trainers.ppo import PPOConfig, PPOTrainer
from alignloop.trainers.prm import PRMConfig, PRMTrainer
from alignloop.trainers.sft import SFTConfig, SFTTrainer
from alignloop.training.loop import set_threads

TASK = "arithmetic"
VERIFIER = "alignloop.demo.arithmetic:verify_answer"
DATA, BASE, SAMPLES, LABELS = "data", "base", "samples", "labels"
PRM_AUTO, PRM_HUMAN, ORM, EVAL, RL, REPORT = "prm_auto", "prm_human", "orm", "eval", "rl", "report"
AGGREGATIONS = ("min", "prod", "last")


@dataclass
class ArithSize:
    """Sizes of every stage (the default is the full demo; `quick()` the reduced one the tests run)."""
    modulus: int | None = 10           # digit arithmetic mod 10 (None: integers 0..99, see demo.arithmetic)
    pretrain_problems: int = 40000
    error_rate: float = 0.3            # per step, in the half of the pretraining solutions that have errors
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 300
    n_positions: int = 128
    pretrain_steps: int = 1500
    pretrain_batch: int = 32
    label_problems: int = 400
    label_samples: int = 4             # solutions per labeling problem
    rollouts: int = 4                  # M: Math-Shepherd rollouts per step prefix
    human_solutions: int = 400         # solutions the simulated labelers label (the first ones)
    n_careful: int = 2
    prm_epochs: int = 3
    prm_learning_rate: float = 5e-4
    prm_batch: int = 16
    test_problems: int = 128
    test_samples: int = 64             # the pool per test problem (best-of-N for N up to it)
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    vote_subsets: int = 256
    beam_problems: int = 64
    beam_width: int = 4
    beam_expand: int = 4
    rl_updates: int = 40
    rl_prompts: int = 8
    rl_generations: int = 4
    rl_learning_rate: float = 5e-5
    rl_kl_coef: float = 0.05
    rl_eval_samples: int = 8           # samples per test problem for the RL policies' solve rate
    max_new_tokens: int = 48

    @classmethod
    def quick(cls) -> ArithSize:
        return cls(pretrain_problems=8000, n_embd=96, pretrain_steps=400, label_problems=64, rollouts=2,
                   human_solutions=128, prm_epochs=2, test_problems=32, test_samples=16,
                   best_of_n=[1, 2, 4, 8, 16], vote_subsets=64, beam_problems=8, beam_width=2, beam_expand=2,
                   rl_updates=4, rl_eval_samples=4)


# ------------------------------------------------------------------------------------------------ tokenizer
def arith_tokenizer(corpus: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained locally whose digits are always single tokens (numbers are read digit by digit, as
    a small model learns arithmetic best); EOS/BOS `<|endoftext|>`, pad `<pad>` (as `alignloop.models.tiny`)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD, UNK], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=UNK, pad_token=PAD)


# ------------------------------------------------------------------------------------------------ stages
def stage_data(folder: Path, size: ArithSize, seed: int) -> dict:
    """Disjoint problem sets and the pretraining solutions (half correct, half with step errors)."""
    test = ar.problems(size.test_problems, seed=seed + 11, modulus=size.modulus)
    seen = {p.expression for p in test}
    label = ar.problems(size.label_problems, seed=seed + 12, exclude=seen, modulus=size.modulus)
    seen |= {p.expression for p in label}
    rl = ar.problems(max(size.rl_updates * size.rl_prompts, 1), seed=seed + 13, exclude=seen,
                     modulus=size.modulus)
    seen |= {p.expression for p in rl}
    pretrain = ar.problems(size.pretrain_problems, seed=seed + 14, exclude=seen, modulus=size.modulus)
    rng = random.Random(seed)
    rows = []
    for p in pretrain:
        rate = 0.0 if rng.random() < 0.5 else size.error_rate
        rows.append({"prompt": p.prompt, "completion": join_steps(ar.write_solution(p, rng, rate))})
    write_rows(rows, folder / "pretrain.jsonl")
    for name, ps_ in (("test", test), ("label", label), ("rl", rl)):
        write_rows([{"prompt": p.prompt, "answer": p.answer} for p in ps_], folder / f"{name}_prompts.jsonl")
    wrong = sum(ar.first_error(r["prompt"], split_steps(r["completion"])) is not None for r in rows)
    return {"pretrain": len(rows), "pretrain_with_errors": wrong / max(len(rows), 1), "label": len(label),
            "rl": len(rl), "test": len(test)}


def stage_base(folder: Path, data: Path, size: ArithSize, seed: int) -> dict:
    """The tokenizer and the base model: a GPT-2 from scratch, trained on the pretraining solutions."""
    rows = [dict(r) for r in read_rows(data / "pretrain.jsonl")]
    tok = arith_tokenizer([r["prompt"] + r["completion"] for r in rows[:4000]], size.vocab_size)
    init = build_tiny_checkpoint(folder / "init", tokenizer=tok, seed=seed, n_layer=size.n_layer,
                                 n_embd=size.n_embd, n_head=size.n_head, n_positions=size.n_positions)
    args = SFTConfig(output_dir=str(folder), max_steps=size.pretrain_steps, learning_rate=2e-3, warmup_steps=30,
                     per_device_batch_size=size.pretrain_batch, lr_scheduler="cosine", max_length=size.n_positions,
                     completion_only_loss=True, seed=seed, progress=False, tensorboard=False, logging_steps=50)
    res = SFTTrainer(model=str(init), args=args, train_dataset=rows).train()
    return {"model": res.output_dir, "steps": res.steps, **{k: v for k, v in res.metrics.items()
                                                              if isinstance(v, (int, float))}}


def params(size: ArithSize) -> SamplingParams:
    return SamplingParams(max_new_tokens=size.max_new_tokens, temperature=1.0)


def candidate(prompt: str, text: str) -> dict:
    """A sampled solution with what the gold verifiers say of it."""
    steps = split_steps(text)
    return {"text": text, "completions": steps, "answer": ar.final_answer(steps),
            "correct": ar.verify_answer(prompt, text), "gold_steps": ar.verify_steps(prompt, steps)}


def sample_pools(policy: str, prompts: list[str], k: int, size: ArithSize, seed: int) -> list[list[dict]]:
    model, tok = load_policy(policy)
    groups = sample_completions(model, tok, prompts, k, params(size), batch_size=256, seed=seed)
    return [[candidate(p, c.text) for c in g] for p, g in zip(prompts, groups, strict=True)]


def stage_samples(folder: Path, run: RunFolder, size: ArithSize, seed: int) -> dict:
    """The base model's solutions: `label_samples` per labeling problem, `test_samples` per test problem."""
    label = [r["prompt"] for r in read_rows(run.data_dir / "label_prompts.jsonl")]
    test = [dict(r) for r in read_rows(run.data_dir / "test_prompts.jsonl")]
    lab = sample_pools(str(run.base_model), label, size.label_samples, size, seed + 21)
    rows = [{"prompt": p, "completions": c["completions"], "correct": c["correct"]}
            for p, g in zip(label, lab, strict=True) for c in g if c["completions"]]
    write_rows(rows, folder / "label_solutions.jsonl")
    pools = sample_pools(str(run.base_model), [r["prompt"] for r in test], size.test_samples, size, seed + 22)
    write_rows([{"prompt": r["prompt"], "right": r["answer"], "candidates": g} for r, g in zip(test, pools,
                                                                                              strict=True)],
               folder / "test_pools.jsonl")
    flat = [c for g in pools for c in g]
    steps = [x for c in flat for x in c["gold_steps"]]
    return {"label_solutions": len(rows), "label_solved": mean([r["correct"] for r in rows]),
            "test_candidates": len(flat), "test_solved": mean([c["correct"] for c in flat]),
            "test_good_steps": mean([x > 0 for x in steps]),
            "test_right_after_wrong_step": mean([c["correct"] and min(c["gold_steps"] or [1]) < 0 for c in flat])}


def stage_labels(folder: Path, run: RunFolder, size: ArithSize, seed: int) -> dict:
    """Math-Shepherd labels of every labeling solution; simulated labelers on the first `human_solutions`."""
    rows = [dict(r) for r in read_rows(run.path(SAMPLES) / "label_solutions.jsonl")]
    model, tok = load_policy(str(run.base_model))
    cont = policy_continuer(model, tok, params(size), batch_size=256, seed=seed + 31)
    auto = math_shepherd_labels([{"prompt": r["prompt"], "completions": r["completions"]} for r in rows], VERIFIER,
                                cont, size.rollouts)
    write_rows(auto, folder / "steps_auto.jsonl")
    subset = [{"prompt": r["prompt"], "completions": r["completions"]} for r in rows[:size.human_solutions]]
    each = ar.simulate_step_labels(subset, ar.default_step_labelers(size.n_careful), seed=seed + 32)
    write_rows(each, folder / "steps_labelers.jsonl")
    human = ar.majority_step_labels(each)
    write_rows(human, folder / "steps_human.jsonl")
    gold = [x for r in auto for x in ar.verify_steps(r["prompt"], r["completions"])]
    auto_labels = [x for r in auto for x in r["labels"]]
    return {"auto_rows": len(auto), "auto_step_accuracy": mean([a == g for a, g in zip(auto_labels, gold,
                                                                                       strict=True)]),
            "auto_good_share": mean([a > 0 for a in auto_labels]), "human_rows": len(human),
            "labeler_step_accuracy": ar.labeler_step_accuracy(each),
            "majority_step_accuracy": ar.labeler_step_accuracy([{**r, "labeler": "majority"}
                                                                for r in human]).get("majority"),
            "rollouts": size.rollouts}


def stage_verifier(folder: Path, run: RunFolder, size: ArithSize, seed: int, rows_file: Path,
                   outcome: bool) -> dict:
    """A PRM (or, `outcome`, the ORM: the outcome view of the same rows) trained from the base model."""
    args = PRMConfig(output_dir=str(folder), loss="bce", outcome=outcome, learning_rate=size.prm_learning_rate,
                     num_epochs=size.prm_epochs, per_device_batch_size=size.prm_batch, max_length=size.n_positions,
                     warmup_steps=10, lr_scheduler="cosine", eval_fraction=0.1, seed=seed, progress=False,
                     tensorboard=False, logging_steps=20)
    res = PRMTrainer(model=str(run.base_model), args=args, train_dataset=str(rows_file)).train()
    return {"model": str(folder / "final"), "steps": res.steps, "rows": str(rows_file),
            **{k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}}


VERIFIERS = {"prm_auto": PRM_AUTO, "prm_human": PRM_HUMAN, "orm": ORM}
LIKELIHOOD = "base_likelihood"   # the diagnostic step scores: the base model's own probability of each step's tokens
BASE_LIKELIHOOD = "base model's likelihood (min; no labels)"


@torch.no_grad()
def likelihood_step_scores(model, tokenizer, prompts: list[str], step_lists: list[list[str]],
                           batch_size: int = 128) -> list[list[float]]:
    """Each step's lowest token probability under `model` (the generator itself): a verifier trained on no label,
    shown beside the PRMs as a diagnostic of what the generator "knows" about its own steps (a sampled wrong digit
    is one the model gave a low probability)."""
    model.eval()
    out: list[list[float]] = []
    for lo in range(0, len(prompts), batch_size):
        examples = []
        for prompt, steps in zip(prompts[lo:lo + batch_size], step_lists[lo:lo + batch_size], strict=True):
            ids, ends = tokenize_steps(tokenizer, prompt, steps) if steps else ([], [])
            start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # the prompt ends with a lone "\n"
            examples.append({"input_ids": ids or [tokenizer.eos_token_id], "step_ends": ends, "start": start})
        input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], tokenizer.pad_token_id, "right")
        logits = model_forward(model, input_ids, attention_mask)
        probs = logits[:, :-1].float().softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        for i, e in enumerate(examples):
            row, prev = [], e["start"] - 1
            for end in e["step_ends"]:
                row.append(float(probs[i, prev:end].min()))   # tokens prev+1 .. end, predicted at prev .. end-1
                prev = end
            out.append(row)
    return out


def step_auc(scores: list[list[float]], gold: list[list[int]]) -> float:
    """P(a good step scores above a bad one) over all steps (ties count half): threshold-free, so verifiers on
    different scales compare."""
    pos = np.sort([v for s, g in zip(scores, gold, strict=True) for v, lab in zip(s, g, strict=False) if lab > 0])
    neg = np.sort([v for s, g in zip(scores, gold, strict=True) for v, lab in zip(s, g, strict=False) if lab <= 0])
    if not len(pos) or not len(neg):
        return float("nan")
    below, upto = np.searchsorted(neg, pos, "left"), np.searchsorted(neg, pos, "right")
    return float(np.mean(below + 0.5 * (upto - below)) / len(neg))


def stage_eval(folder: Path, run: RunFolder, size: ArithSize, seed: int) -> dict:
    """Score the test pools with the three verifiers; their accuracy against the gold verifiers; best-of-N curves;
    PRM beam search."""
    pools = [dict(r) for r in read_rows(run.path(SAMPLES) / "test_pools.jsonl")]
    prompts = [p["prompt"] for p in pools for _ in p["candidates"]]
    steps = [c["completions"] for p in pools for c in p["candidates"]]
    scores = {}
    for name, stage in VERIFIERS.items():
        scorer = load_scorer(str(run.path(stage) / "final"), batch_size=128)
        scores[name] = [[0.0 if v is None else float(v) for v in row] for row in scorer.score_steps(prompts, steps)]
    model, tok = load_policy(str(run.base_model))
    scores[LIKELIHOOD] = likelihood_step_scores(model, tok, prompts, steps)
    flat = [c for p in pools for c in p["candidates"]]
    for j, c in enumerate(flat):
        c["scores"] = {name: s[j] for name, s in scores.items()}
    write_rows(pools, folder / "scored_pools.jsonl")
    accuracy = verifier_accuracy(flat)
    curves = best_of_n_curves(pools, size)
    write_json(folder / "best_of_n.json", curves)
    beam = beam_search_eval(run, pools[:size.beam_problems], size, seed)
    return {"verifiers": accuracy, "best_of_n": curves, "beam_search": beam}


def verifier_accuracy(flat: list[dict]) -> dict:
    """Per verifier: `step_auc` of its running minimum ("no error so far", what min aggregation uses) against the
    gold first-error labels, and its outcome accuracy (min over steps, the ORM's last step, >= 0.5 against the final
    answer); the PRMs' step accuracy (P(good) >= 0.5) and first-error accuracy. The base model's likelihood (a
    probability of tokens, not of a right step) gets its AUC only."""
    out = {}
    for name in (*VERIFIERS, LIKELIHOOD):
        if not all(name in c["scores"] for c in flat):
            continue
        hits, first, outcome, running = [], [], [], []
        for c in flat:
            s, g = c["scores"][name], c["gold_steps"]
            running.append(list(accumulate(s, min)))
            if name.startswith("prm"):
                hits += [(v >= 0.5) == (lab > 0) for v, lab in zip(s, g, strict=False)]
                pred = next((i for i, v in enumerate(s) if v < 0.5), None)
                first.append(pred == next((i for i, lab in enumerate(g) if lab < 0), None))
            agg = aggregate_step_scores([s], "last" if name == "orm" else "min")[0]
            outcome.append((agg >= 0.5) == bool(c["correct"]))
        out[name] = {"step_auc": step_auc(running, [c["gold_steps"] for c in flat])}
        if name != LIKELIHOOD:
            out[name]["outcome_accuracy"] = mean(outcome)
        if hits:
            out[name].update(step_accuracy=mean(hits), first_error_accuracy=mean(first))
    return out


def method_pools(pools: list[dict]) -> dict[str, list[dict]]:
    """Per method, the estimator's view of each test problem: candidates' scores (or answers and vote weights)."""
    def view(score: Callable[[dict], float]) -> list[dict]:
        return [{"scores": [score(c) for c in p["candidates"]], "correct": [c["correct"] for c in p["candidates"]],
                 "answers": [c["answer"] for c in p["candidates"]], "right": p["right"]} for p in pools]

    out = {f"PRM auto ({how})": view(lambda c, h=how: aggregate_step_scores([c["scores"]["prm_auto"]], h)[0])
           for how in AGGREGATIONS}
    out.update({f"PRM labelers ({how})": view(lambda c, h=how: aggregate_step_scores([c["scores"]["prm_human"]],
                                                                                    h)[0]) for how in AGGREGATIONS})
    out["ORM"] = view(lambda c: aggregate_step_scores([c["scores"]["orm"]], "last")[0])
    if all(LIKELIHOOD in c["scores"] for p in pools for c in p["candidates"]):
        out[BASE_LIKELIHOOD] = view(lambda c: aggregate_step_scores([c["scores"][LIKELIHOOD]], "min")[0])
    out["oracle (pass@N)"] = view(lambda c: float(c["correct"]))
    return out


def best_of_n_curves(pools: list[dict], size: ArithSize) -> dict[str, dict[str, float]]:
    """Solve rate against N for every method (keys: method -> {"N": rate})."""
    ns = [n for n in size.best_of_n if n <= size.test_samples]
    views = method_pools(pools)
    curves = {name: ps.solve_rate_curve(v, ns, "score") for name, v in views.items()}
    curves["majority voting"] = ps.solve_rate_curve(views["ORM"], ns, "majority", subsets=size.vote_subsets)
    curves["PRM-weighted voting"] = ps.solve_rate_curve(views["PRM auto (min)"], ns, "weighted",
                                                        subsets=size.vote_subsets)
    return {name: {str(n): v for n, v in c.items()} for name, c in curves.items()}


def beam_search_eval(run: RunFolder, pools: list[dict], size: ArithSize, seed: int) -> dict:
    """PRM-guided step-level beam search (the automatic-label PRM, min) on the first test problems, against
    best-of-N at about the same number of sampled steps."""
    if not pools:
        return {}
    model, tok = load_policy(str(run.base_model))
    step_params = SamplingParams(max_new_tokens=16, temperature=1.0, stop_strings=("\n",))
    cont = policy_continuer(model, tok, step_params, batch_size=256, seed=seed + 41)
    scorer = load_scorer(str(run.path(PRM_AUTO) / "final"), batch_size=128)
    prompts = [p["prompt"] for p in pools]
    out = ps.prm_beam_search(prompts, cont, scorer, beam_width=size.beam_width, expand=size.beam_expand,
                             max_steps=6, aggregate="min", is_final=lambda s: s.startswith(ar.ANSWER_PREFIX))
    solved = [ar.verify_answer(p, o["text"]) for p, o in zip(prompts, out, strict=True)]
    n = size.beam_width * size.beam_expand   # sampled next steps per step: best-of-N with N = width x expand
    n_bon = min(n, size.test_samples)
    views = method_pools(pools)
    return {"problems": len(pools), "beam_width": size.beam_width, "expand": size.beam_expand,
            "solve_rate": mean(solved), "best_of_n": n_bon,
            "prm_best_of_n_solve_rate": ps.solve_rate_curve(views["PRM auto (min)"], [n_bon], "score")[n_bon]}


def stage_rl(folder: Path, run: RunFolder, size: ArithSize, seed: int) -> dict:
    """PPO and RLOO from the base model with outcome rewards (the ORM's score at the end of the response) and with
    process rewards (the PRM's score of each step on its step-end token); the solve rate of each policy (and of the
    base model) on the test problems. Both algorithms see `rl_prompts` x `rl_generations` samples per update."""
    prompts = [r["prompt"] for r in read_rows(run.data_dir / "rl_prompts.jsonl")]
    test = [dict(r) for r in read_rows(run.data_dir / "test_prompts.jsonl")]
    out = {"base": solve_rate(str(run.base_model), test, size, seed)}
    common = {"total_updates": size.rl_updates, "learning_rate": size.rl_learning_rate,
              "max_new_tokens": size.max_new_tokens, "kl_coef": size.rl_kl_coef, "reward_normalization": "none",
              "seed": seed, "progress": False, "tensorboard": False, "lr_scheduler": "constant", "sample_every": 0}
    for algo in ("PPO", "RLOO"):
        for name, reward, granularity in (("outcome (ORM)", ORM, "outcome"), ("process (PRM)", PRM_AUTO, "process")):
            sub = folder / f"{algo.lower()}_{granularity}"
            # process: PPO pays each step the drop of the PRM's running min (the return is the min score - 1):
            # summed step scores paid PPO for writing more steps (measured: KL 38, solve rate 0.001); RLOO takes
            # the step scores, normalised over the group (DeepSeekMath)
            step = {"reward_granularity": granularity,
                    "step_reward": "delta" if granularity == "process" and algo == "PPO" else "score"}
            if algo == "RLOO":
                args = RLOOConfig(output_dir=str(sub), rollout_batch_size=size.rl_prompts,
                                  num_generations=size.rl_generations, **step, **common)
                trainer = GRPOTrainer(model=str(run.base_model), reward=str(run.path(reward) / "final"), args=args,
                                      train_dataset=prompts, gold_reward=ar.gold_scores)
            else:
                args = PPOConfig(output_dir=str(sub), rollout_batch_size=size.rl_prompts * size.rl_generations,
                                 **step, **common)
                trainer = PPOTrainer(model=str(run.base_model), reward=str(run.path(reward) / "final"), args=args,
                                     train_dataset=prompts, gold_reward=ar.gold_scores)
            res = trainer.train()
            out[f"{algo} {name}"] = {**solve_rate(str(sub / "final"), test, size, seed), "updates": res.steps,
                                     "reward_mean": res.metrics.get("reward/mean"),
                                     "gold_mean": res.metrics.get("reward/gold_mean"),
                                     "kl": res.metrics.get("objective/kl")}
    return out


def solve_rate(policy: str, test: list[dict], size: ArithSize, seed: int) -> dict:
    """Mean share of `rl_eval_samples` samples per test problem whose final answer is right (and whose steps are all
    right)."""
    pools = sample_pools(policy, [r["prompt"] for r in test], size.rl_eval_samples, size, seed + 51)
    flat = [c for g in pools for c in g]
    return {"solve_rate": mean([c["correct"] for c in flat]),
            "all_steps_right": mean([bool(c["gold_steps"]) and min(c["gold_steps"]) > 0 for c in flat])}


# ------------------------------------------------------------------------------------------------ report
def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))


MAIN_METHODS = ("PRM auto (min)", "PRM labelers (min)", "ORM", "majority voting", "PRM-weighted voting",
                BASE_LIKELIHOOD, "oracle (pass@N)")


def best_of_n_table(curves: dict[str, dict[str, float]], methods=None) -> str:
    methods = [m for m in (methods or curves) if m in curves]
    ns = list(next(iter(curves.values())))
    return table(["method"] + [f"N={n}" for n in ns], [[m] + [curves[m][n] for n in ns] for m in methods])


def plot_curves(curves: dict[str, dict[str, float]], path: Path) -> Path:
    """Solve rate against N (log2 x-axis) for the main methods."""
    import matplotlib  # noqa: PLC0415 - the backend is chosen only when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after the backend

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"oracle (pass@N)": dict(color="grey", linestyle=":"), "majority voting": dict(marker="s"),
              "ORM": dict(marker="^"), "PRM auto (min)": dict(marker="o", linewidth=2),
              "PRM labelers (min)": dict(marker="D"), "PRM-weighted voting": dict(marker="x", linestyle="--"),
              BASE_LIKELIHOOD: dict(color="black", linestyle="-.", linewidth=1)}
    for m in MAIN_METHODS:
        if m in curves:
            ns = [int(n) for n in curves[m]]
            ax.plot(ns, list(curves[m].values()), label=m, **styles.get(m, {}))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("N (solutions sampled per problem)")
    ax.set_ylabel("solve rate (test problems)")
    ax.set_title("Best-of-N on the arithmetic task")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_report(folder: Path, run: RunFolder, size: ArithSize) -> dict:
    info = {s: run.info(s) or {} for s in (DATA, BASE, SAMPLES, LABELS, PRM_AUTO, PRM_HUMAN, ORM, EVAL, RL)}
    ev, rl, lab, smp = info[EVAL], info[RL], info[LABELS], info[SAMPLES]
    curves = ev["best_of_n"]
    plot = plot_curves(curves, run.plots_dir / "solve_rate_vs_n.png")
    (folder / "best_of_n.md").write_text(best_of_n_table(curves) + "\n")
    ns = list(curves["ORM"])
    big = ns[-1]
    prm, orm, maj = (curves[m][big] for m in ("PRM auto (min)", "ORM", "majority voting"))
    one = curves["ORM"][ns[0]]
    verdict = (f"At N={big} the PRM (automatic labels) solves {prm:.3f}, the ORM {orm:.3f}, majority voting "
               f"{maj:.3f} (N=1: {one:.3f}): the PRM {'beats' if prm > orm else 'does not beat'} the ORM"
               + ("" if min(prm, orm) >= one else f", and {'both fall' if max(prm, orm) < one else 'one falls'} "
                  f"below a single sample (over-optimised: the highest-scored of many samples is more often a "
                  f"wrong one the verifier misjudges)") + ".")
    md = ["# Process reward models on toy arithmetic", "",
          "`alignloop demo --task arithmetic`: a small GPT-2 trained from scratch on step-by-step solutions (half with "
          "injected step errors) solves chains of 2-4 operations; its samples are verified by a PRM trained on "
          "Math-Shepherd labels, a PRM trained on simulated step labelers, and an ORM (the same trainer on the "
          "outcome view of the automatic rows). Solve rate of best-of-N is estimated without bias from "
          f"{size.test_samples} samples per test problem ({size.test_problems} problems).", "",
          f"**{verdict}**", "", "## Best-of-N solve rate", "", best_of_n_table(curves, MAIN_METHODS), "",
          f"![solve rate against N](plots/{plot.name})", "", "All aggregations:", "", best_of_n_table(curves), "",
          "## Verifiers against the gold step and answer checks (test candidates)", "",
          table(["verifier", "step AUC (running min)", "step accuracy", "first-error accuracy", "outcome accuracy"],
                [[n, v.get("step_auc"), v.get("step_accuracy"), v.get("first_error_accuracy"),
                  v.get("outcome_accuracy")] for n, v in ev["verifiers"].items()]), "",
          f"`{LIKELIHOOD}` is a diagnostic, trained on no label: each step's lowest token probability under the base "
          "model that wrote the samples. It shows what the generator itself knows of its sampled mistakes; a PRM "
          "starts from the same model and has to learn from the labels to read that knowledge at the step's "
          "separator.", "",
          "## Data and labels", "",
          table(["figure", "value"], [
              ["base model: test samples solved (N=1)", smp.get("test_solved")],
              ["base model: steps right (first-error labels)", smp.get("test_good_steps")],
              ["right final answer after a wrong step (outcome label noise)", smp.get("test_right_after_wrong_step")],
              ["Math-Shepherd labels: rows", lab.get("auto_rows")],
              [f"Math-Shepherd hard labels equal to the gold step labels (M={lab.get('rollouts')})",
               lab.get("auto_step_accuracy")],
              ["simulated labelers: rows (majority of 3)", lab.get("human_rows")],
              ["labelers' majority equal to the gold step labels", lab.get("majority_step_accuracy")]]
              + [[f"labeler {w}: step accuracy", a] for w, a in (lab.get("labeler_step_accuracy") or {}).items()]),
          ""]
    beam = ev.get("beam_search") or {}
    if beam:
        md += ["## PRM-guided beam search", "",
               table(["problems", "width x expand", "beam search solve rate", "PRM best-of-N (same N)"],
                     [[beam["problems"], f"{beam['beam_width']} x {beam['expand']}", beam["solve_rate"],
                       f"{fmt(beam['prm_best_of_n_solve_rate'])} (N={beam['best_of_n']})"]]), ""]
    if rl:
        md += ["## PPO and RLOO with outcome vs process rewards", "",
               table(["policy", "solve rate", "all steps right", "updates", "KL"],
                     [[name, v.get("solve_rate"), v.get("all_steps_right"), v.get("updates"), v.get("kl")]
                      for name, v in rl.items() if isinstance(v, dict)]), ""]
    times = run.timings()
    md += ["## Stage times (s)", "", table(["stage", "seconds"], [[k, float(v)] for k, v in times.items()]), ""]
    run.report_md.write_text("\n".join(md))
    results = {"task": TASK, "best_of_n": curves, "verifiers": ev["verifiers"], "beam_search": beam, "rl": rl,
               "labels": lab, "samples": smp, "verdict": verdict, "plot": str(plot), "size": asdict(size)}
    write_json(run.root / "results.json", results)
    return {"report": str(run.report_md), "plot": str(plot), "verdict": verdict}


# ------------------------------------------------------------------------------------------------ entry point
def run_arith_demo(output_dir: str | Path = "runs/demo-arithmetic", size: ArithSize | None = None, seed: int = 0,
                   resume: bool = False, echo: Callable[[str], None] = print, threads: int | None = None,
                   rl: bool = True) -> dict:
    """Run (or resume) the arithmetic demo; returns {"run", "report", "plot", "results"}."""
    set_threads(threads)
    out = Path(output_dir)
    run = RunFolder(out, echo)
    state_file = run.demo_state
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("task", "reviews") != TASK:
            raise UserError(f"{out} holds a run of the movie-review demo; use another --output-dir")
        if resume:
            size, seed, rl = ArithSize(**state["size"]), state["seed"], state.get("rl", rl)
    size = size or ArithSize()
    write_json(state_file, {"task": TASK, "size": asdict(size), "seed": seed, "rl": rl})
    run.stage(DATA, lambda f: stage_data(f, size, seed))
    run.stage(BASE, lambda f: stage_base(f, run.data_dir, size, seed))
    run.stage(SAMPLES, lambda f: stage_samples(f, run, size, seed))
    run.stage(LABELS, lambda f: stage_labels(f, run, size, seed))
    run.stage(PRM_AUTO, lambda f: stage_verifier(f, run, size, seed, run.path(LABELS) / "steps_auto.jsonl", False))
    run.stage(PRM_HUMAN, lambda f: stage_verifier(f, run, size, seed, run.path(LABELS) / "steps_human.jsonl", False))
    run.stage(ORM, lambda f: stage_verifier(f, run, size, seed, run.path(LABELS) / "steps_auto.jsonl", True))
    run.stage(EVAL, lambda f: stage_eval(f, run, size, seed))
    if rl:
        run.stage(RL, lambda f: stage_rl(f, run, size, seed))
    rep = run.stage(REPORT, lambda f: stage_report(f, run, size))
    results = json.loads((run.root / "results.json").read_text())
    return {"run": str(out), "report": rep["report"], "plot": rep["plot"], "results": results}
