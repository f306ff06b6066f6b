"""`alignloop judge` (also `alignloop feedback judge`): an AI labeler judges a feedback project's pairwise (and rank)
items against a constitution and stores its judgements as a labeler of kind "ai", beside people's.

    alignloop judge --db feedback.db --project round-1 --judge ./judge-model --constitution c.yaml
    alignloop judge --db feedback.db --project round-1 --judge mypkg.judges:prefer_shorter --single-order

Then `alignloop feedback stats` reports its agreement with people (κ, position bias) and `alignloop feedback export
--labelers human|ai|all` keeps or drops its labels. Prints one JSON line (see `judge_project`).
"""
from __future__ import annotations

import json
import time

import click


@click.command(name="judge", help="AI labeler: judge a feedback project's items against a constitution, scored by "
                                  "the log-probabilities of the answers, in both orders; stored as a labeler of "
                                  "kind ai.")
@click.option("--db", required=True, help="The feedback database (SQLite file or SQLAlchemy URL).")
@click.option("--project", required=True, help="The project (pairwise or rank) whose items are judged.")
@click.option("--judge", "judge_spec", required=True,
              help="The judge: a causal LM (local folder or hub id; its chat template is used when it has one) or "
                   "module:function, f(prompts, firsts, seconds, questions) -> P(first is better) per pair.")
@click.option("--constitution", default=None, help="Constitution YAML (principles and their comparison questions); "
                                                   "default: the built-in helpful-honest-harmless one.")
@click.option("--labeler", default=None, help="The AI labeler's name in the store (default ai-<model folder>, e.g. "
                                              "ai-base-final).")
@click.option("--single-order", is_flag=True, help="Judge each pair in one (random) order only: faster, but the "
                                                   "judge's position bias stays in its labels.")
@click.option("--principles", type=click.Choice(["sample", "all"]), default="sample", show_default=True,
              help="One principle drawn per pair, or every principle asked and the probabilities averaged.")
@click.option("--cot", is_flag=True, help="Chain-of-thought: the judge writes its reasoning first (models only).")
@click.option("--cot-max-new-tokens", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--dtype", default=None, help="The judge model's dtype (float32, bfloat16, auto).")
@click.option("--limit", type=int, default=None, help="Judge only the first N items.")
@click.option("--seed", type=int, default=0, show_default=True)
def judge(db, project, judge_spec, constitution, labeler, single_order, principles, cot, cot_max_new_tokens,
          batch_size, dtype, limit, seed):
    from alignloop.ai_feedback.judge import judge_project, load_judge  # noqa: PLC0415 - torch/transformers: keeps `feedback --help` fast
    from alignloop.feedback.store import Store  # noqa: PLC0415 - the web extra, needed by this command only

    start = time.perf_counter()
    j = load_judge(judge_spec, constitution, cot=cot, cot_max_new_tokens=cot_max_new_tokens, batch_size=batch_size,
                   dtype=dtype)
    store = Store(db, create=False)
    try:
        summary = judge_project(store, project, j, labeler=labeler, both_orders=not single_order,
                                principles=principles, seed=seed, limit=limit)
    finally:
        store.dispose()
    click.echo(json.dumps({**summary, "seconds": round(time.perf_counter() - start, 2)}))
