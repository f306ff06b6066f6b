"""The evaluation stage of the pipeline: every policy against the SFT model, by the gold scorer and the reward model.

For each policy: samples on the held-out prompts, mean gold and reward-model score, win rate against independent
SFT samples on the same prompts, KL to the SFT model (Σ_t k1 on the policy's samples), length. Best-of-N for each N
of `eval.best_of_n`: max(N) SFT candidates per prompt scored by the reward model once, the best of the first N kept;
its KL is the analytic log N − (N−1)/N (Beirami et al. 2024).
"""
from __future__ import annotations

import json
from pathlib import Path

from alignloop.evaluation import (
    best_of_n,
    first_of_each,
    load_policy,
    sample_policy,
    score,
    summarize,
)
from alignloop.demo.pipeline import write_jsonl
from alignloop.scoring import load_function, load_scorer


def stage_eval(pipe, folder: Path, policies: dict[str, str], sft: str, rm: str | None) -> dict:
    ev = pipe.cfg.eval
    prompts = pipe.eval_prompts
    n = ev.samples_per_prompt
    gold = load_function(ev.gold) if ev.gold else None
    scorer = load_scorer(rm, batch_size=64) if rm else None
    sft_model, sft_tok = load_policy(sft)
    # independent SFT samples: the reference every win rate is computed against
    reference = score(sample_policy(sft_model, sft_tok, prompts, n, ev.max_new_tokens, ev.temperature,
                                    seed=ev.seed), scorer, gold)
    write_jsonl(reference.to_rows(), folder / "samples_reference.jsonl")
    summary: dict[str, dict] = {}
    samples: dict[str, list[dict]] = {}
    bon: dict[str, dict] = {}
    big_n = max(ev.best_of_n) if ev.best_of_n and scorer is not None else n
    # SFT candidates (the first of each prompt is the SFT row; all of them feed best-of-N)
    cand = score(sample_policy(sft_model, sft_tok, prompts, big_n, ev.max_new_tokens, ev.temperature,
                               seed=ev.seed + 1, ref_model=sft_model), scorer, gold)
    sft_s = first_of_each(cand, big_n)
    summary["SFT"] = summarize(sft_s, reference)
    samples["SFT"] = sft_s.to_rows()
    if scorer is not None:
        for N in ev.best_of_n:
            s = best_of_n(cand, big_n, N, key="rm")
            bon[str(N)] = summarize(s, reference)
            samples[f"best-of-{N}"] = s.to_rows()
        summary[f"best-of-{max(ev.best_of_n)}"] = bon[str(max(ev.best_of_n))]
    for name, path in policies.items():
        if name == "SFT":
            continue
        model, tok = load_policy(path)
        s = score(sample_policy(model, tok, prompts, n, ev.max_new_tokens, ev.temperature, seed=ev.seed + 2,
                                ref_model=sft_model), scorer, gold)
        summary[name] = summarize(s, reference)
        samples[name] = s.to_rows()
        del model
    for name, rows in samples.items():
        write_jsonl(rows, folder / f"samples_{name.replace(' ', '_')}.jsonl")
    results = {"summary": summary, "best_of_n": bon, "policies": policies, "reference": sft, "reward_model": rm,
               "gold": ev.gold, "prompts": len(prompts), "samples_per_prompt": n}
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    return results
