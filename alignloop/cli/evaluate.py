"""`alignloop eval`: a policy against a reference, judged by a reward model, a gold function, an AI judge (`--judge`)
and/or people."""
from __future__ import annotations

import json
from pathlib import Path

import click

from alignloop.ai_feedback.judge import ai_win_rate, load_judge
from alignloop.data import check_writable, prompt_texts, write_rows
from alignloop.errors import UserError
from alignloop.evaluation import evaluate_policy, people_win_rate
from alignloop.scoring import STEP_AGGREGATION_HELP, STEP_AGGREGATIONS, load_function, load_scorer


@click.command(name="eval", help="Evaluate a policy against a reference on prompts: win rate judged by a reward "
                                 "model, a Python gold function and/or an AI judge (--judge), KL to the reference, "
                                 "reward, length. "
                                 "--human-db also imports (policy, reference) pairs for people to judge in the app; "
                                 "--tally then reports the people's win rate.")
@click.option("--policy", default=None, help="Policy model (hub id or local folder).")
@click.option("--reference", default=None, help="Reference model, e.g. the SFT model (same tokenizer).")
@click.option("--prompts", "prompts_file", default=None, help="Prompt file (rows with a 'prompt' field).")
@click.option("--reward-model", default=None, help="Reward model judging the win rate (local folder or hub id).")
@click.option("--step-aggregation", type=click.Choice(STEP_AGGREGATIONS), default=None,
              help="With a process reward model as --reward-model: " + STEP_AGGREGATION_HELP)
@click.option("--gold", default=None, help="Gold scorer module:function, f(prompts, responses) -> list[float].")
@click.option("--judge", "judge_spec", default=None,
              help="AI judge (a causal LM folder / hub id, or module:function): the AI-judged win rate of the policy "
                   "against the reference, each pair judged in both orders against the constitution.")
@click.option("--constitution", default=None, help="With --judge: the constitution YAML (default: the built-in one).")
@click.option("-n", "--samples-per-prompt", type=int, default=1, show_default=True)
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--max-prompts", type=int, default=None, help="Use only the first N prompts.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default=None, help="Write the samples (JSONL) and the summary (.json next to it) here.")
@click.option("--human-db", default=None, help="Import (policy, reference) pairs into this feedback database for "
                                               "people to judge in the app (alignloop feedback serve).")
@click.option("--human-project", default="eval", show_default=True, help="The feedback project of those pairs.")
@click.option("--tally", is_flag=True, help="With --human-db: report the people's win rate from their judgements "
                                            "(no sampling).")
def eval_cmd(policy, reference, prompts_file, reward_model, step_aggregation, gold, judge_spec, constitution,
             samples_per_prompt, max_new_tokens, temperature, max_prompts, seed, out, human_db, human_project, tally):
    if tally:
        if not human_db:
            raise UserError("--tally needs --human-db (and --human-project)")
        from alignloop.feedback.importing import comparable_completions  # noqa: PLC0415 - web extra, as below
        from alignloop.feedback.store import Store  # noqa: PLC0415 - the web extra: only --human-db needs it

        store = Store(human_db, create=False)
        try:
            click.echo(json.dumps({"project": human_project, **people_win_rate(store, human_project)}))
        finally:
            store.dispose()
        return
    missing = [f"--{n}" for n, v in (("policy", policy), ("reference", reference), ("prompts", prompts_file)) if not v]
    if missing:
        raise UserError(f"missing {', '.join(missing)}")
    if reward_model is None and gold is None and human_db is None and judge_spec is None:
        raise UserError("give a judge: --reward-model, --gold module:function, --judge, or --human-db")
    if out:
        check_writable(out)   # before any work: the format follows the suffix
    prompts = prompt_texts(prompts_file, max_prompts=max_prompts or None)
    rm = load_scorer(reward_model, batch_size=64, step_aggregation=step_aggregation) if reward_model else None
    judge = load_judge(judge_spec, constitution) if judge_spec else None   # before sampling: a bad spec fails fast
    gold_fn = load_function(gold) if gold else None
    summary, s, ref = evaluate_policy(policy, reference, prompts, rm=rm, gold=gold_fn, n=samples_per_prompt,
                                      max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    summary = {"policy": policy, "reference": reference, **summary}
    if judge is not None:
        summary.update(ai_win_rate(judge, s.prompts, s.responses, ref.responses, seed=seed))
    for k in ("gold", "rm"):
        if k in ref.scores:
            summary[f"reference/{k}/mean"] = sum(ref.scores[k]) / len(ref.scores[k])
    if out:
        rows = [{**r, "reference_response": rr["response"], **{f"reference_{k}": rr[k] for k in ("gold", "rm")
                                                               if k in rr}}
                for r, rr in zip(s.to_rows(), ref.to_rows(), strict=True)]
        write_rows(rows, Path(out))
        Path(out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    if human_db:
        from alignloop.feedback.importing import comparable_completions  # noqa: PLC0415 - web extra, as below
        from alignloop.feedback.store import Store  # noqa: PLC0415 - the web extra: only --human-db needs it

        store = Store(human_db)
        try:
            try:
                store.get_project(human_project)
            except UserError:
                store.create_project(human_project, "pairwise", overlap_k=1,
                                     guidelines_md="# Which completion is better?\nPick the better completion.")
            rows = [{"prompt": p, "completions": [
                {"text": a, "model": policy, "params": {"eval_role": "policy"}},
                {"text": b, "model": reference, "params": {"eval_role": "reference"}}]}
                for p, a, b in zip(s.prompts, s.responses, ref.responses, strict=True)]
            # an empty answer, or both the same: nothing for a person to compare (the import refuses them)
            rows = [r for r in comparable_completions(rows)[0] if len(r["completions"]) == 2]
            res = store.import_records(human_project, rows)
            summary["human"] = {"db": human_db, "project": human_project, "items": res.items,
                                "next": f"alignloop feedback serve --db {human_db}; then alignloop eval --tally "
                                        f"--human-db {human_db} --human-project {human_project}"}
        finally:
            store.dispose()
    click.echo(json.dumps(summary))
