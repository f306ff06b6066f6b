"""`alignloop demo`: the whole loop on the built-in toy task (`alignloop.demo`); `--task arithmetic`: process reward
models against outcome reward models and majority voting (`alignloop.demo.arith_demo`); `--personal`: a single
reward model against a personalized one for two labeler populations with opposing tastes (`alignloop.demo.personal`)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from alignloop.cli.pipeline import echo, print_summary, serve_for_human
from alignloop.demo.arith_demo import MAIN_METHODS, ArithSize, best_of_n_table, run_arith_demo
from alignloop.demo.demo import DemoSize, run_demo
from alignloop.demo.personal import PersonalSize, run_personal_demo
from alignloop.errors import UserError
from alignloop.pipeline import RunFolder

TASKS = ("reviews", "arithmetic")
DEFAULT_DIRS = {"reviews": "runs/demo", "arithmetic": "runs/demo-arithmetic", "personal": "runs/demo-personal"}


@click.command(help="Run the whole loop on a built-in toy task (short movie reviews) on CPU with no downloads: "
                    "pretrain a small LM, SFT, sample into the feedback store, simulated labelers, reward model, "
                    "PPO, DPO, best-of-N, rejection sampling, evaluation and an HTML/Markdown report.")
@click.option("--task", type=click.Choice(TASKS), default="reviews", show_default=True,
              help="reviews: the RLHF loop on short movie reviews. arithmetic: process reward models (Math-Shepherd "
                   "labels and simulated step labelers) against an outcome reward model and majority voting on "
                   "multi-step arithmetic: best-of-N solve rate for N = 1..64, its plot, and PPO and RLOO with outcome "
                   "vs process rewards.")
@click.option("--personal", is_flag=True,
              help="Personalization on the movie reviews: two simulated labeler populations with opposing hidden "
                   "tastes (warm, enthusiastic reviews vs balanced, specific critiques); a single reward model against "
                   "one with per-group heads and a population head (accuracy per group), few-shot weights for new "
                   "users (how many judgements beat the population model), and RLOO policies: generic against "
                   "user-tagged (each group's gold score).")
@click.option("--output-dir", default=None, help="The run folder (default runs/demo; runs/demo-arithmetic with "
                                                 "--task arithmetic; runs/demo-personal with --personal).")
@click.option("--quick", is_flag=True, help="Reduced sizes (a few minutes; what the tests run).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--human", is_flag=True, help="Stop after sampling and serve the labeling app for people to judge; "
                                            "then run `alignloop demo --resume`.")
@click.option("--feedback-mode", type=click.Choice(("pairs", "conversation")), default="pairs", show_default=True,
              help="--human: pairs (judge two sampled reviews at a time) or conversation (talk with the SFT model in "
                   "the app: at each turn pick the better of its two replies on the 8-point scale, end with a 1-7 "
                   "rating; each choice trains the reward model).")
@click.option("--demonstrations", is_flag=True,
              help="--human: first write demonstrations in the app (improve the base model's review of each prompt, "
                   "or write your own); SFT trains on them beside the generated ones. Then the run continues.")
@click.option("--resume", is_flag=True, help="Continue a run: finished stages are skipped.")
@click.option("--host", default="127.0.0.1", show_default=True, help="--human: where to serve the app.")
@click.option("--port", type=int, default=8000, show_default=True, help="--human: port of the app.")
@click.option("--no-serve", is_flag=True, hidden=True, help="--human: prepare but do not start the server.")
@click.option("--threads", type=int, default=None,
              help="Torch CPU threads (default: all cores on an idle machine, 1 on a busy one).")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="Rounds of sample -> label -> reward model -> PPO, each sampling from the last PPO policy.")
@click.option("--ai-feedback", is_flag=True,
              help="Also Constitutional AI and RLAIF: the base model learns to critique, revise and compare, labels "
                   "round 1 as an AI labeler beside the simulated people, and SL-CAI and RL-CAI policies are trained "
                   "and compared with the human-feedback ones.")
def demo(task, personal, output_dir, quick, seed, human, feedback_mode, demonstrations, resume, host, port, no_serve,
         threads, rounds, ai_feedback):
    if personal and task != "reviews":
        raise UserError("--personal is a demo of its own on the movie reviews; it takes no --task")
    task = "personal" if personal else task
    output_dir = output_dir or DEFAULT_DIRS[task]
    out = Path(output_dir)
    state = RunFolder(out, create=False).demo_state
    ran = json.loads(state.read_text()).get("task", "reviews") if state.exists() else task
    if ran != task:
        raise UserError(f"{out} holds a run of the {ran} demo; use another --output-dir")
    others = human or ai_feedback or rounds != 1 or demonstrations or feedback_mode != "pairs"
    if task == "arithmetic":
        arithmetic_demo(out, quick, seed, resume, threads, others)
        return
    if task == "personal":
        personal_demo(out, quick, seed, resume, threads, others)
        return
    if not resume and RunFolder(out, create=False).demo_state.exists():
        echo(f"{out} holds an earlier run: finished stages are reused (use another --output-dir to start over)")
    size = DemoSize.quick() if quick else DemoSize()
    result = run_demo(out, size, seed=seed, human=human, resume=resume, echo=echo, threads=threads,
                      rounds=rounds, ai_feedback=ai_feedback, feedback_mode=feedback_mode,
                      demonstrations=demonstrations)
    if result.get("stopped") == "human":
        click.echo(json.dumps({"stopped": "human", "db": result["db"], "project": result["project"],
                               "task": result.get("task", "pairwise")}))
        serve_for_human(result["db"], result["project"], host, port, not no_serve,
                         f"alignloop demo --resume --output-dir {output_dir}")
        return
    click.echo(json.dumps({k: result[k] for k in ("run", "sft", "reward_model", "policies", "report")}))
    print_summary(result)


def arithmetic_demo(out: Path, quick: bool, seed: int, resume: bool, threads: int | None, other_options: bool) -> None:
    """`--task arithmetic`: run it, print the summary line, the best-of-N table and where the report is."""
    if other_options:
        raise UserError("--human, --rounds, --ai-feedback, --feedback-mode and --demonstrations belong to the "
                        "movie-review demo, not --task arithmetic")
    if not resume and RunFolder(out, create=False).demo_state.exists():
        echo(f"{out} holds an earlier run: finished stages are reused (use another --output-dir to start over)")
    result = run_arith_demo(out, ArithSize.quick() if quick else None, seed=seed, resume=resume, echo=echo,
                            threads=threads)
    res = result["results"]
    click.echo(json.dumps({"run": result["run"], "report": result["report"], "plot": result["plot"],
                           "verdict": res["verdict"]}))
    echo("")
    echo(best_of_n_table(res["best_of_n"], MAIN_METHODS))
    echo("")
    echo(res["verdict"])
    echo(f"report: {result['report']}  plot: {result['plot']}")


def personal_demo(out: Path, quick: bool, seed: int, resume: bool, threads: int | None, other_options: bool) -> None:
    """`--personal`: run it, print the summary line, the reward models' and policies' tables and where the report is."""
    if other_options:
        raise UserError("--human, --rounds, --ai-feedback, --feedback-mode and --demonstrations belong to the "
                        "default demo, not --personal")
    if not resume and RunFolder(out, create=False).demo_state.exists():
        echo(f"{out} holds an earlier run: finished stages are reused (use another --output-dir to start over)")
    result = run_personal_demo(out, PersonalSize.quick() if quick else None, seed=seed, resume=resume, echo=echo,
                               threads=threads)
    res = result["results"]
    click.echo(json.dumps({"run": result["run"], "report": result["report"], "html": result["html"],
                           "plot": result["plot"], "verdict": res["verdict"]}))
    echo("")
    for line in personal_summary(res):
        echo(line)
    echo(f"report: {result['report']}  html: {result['html']}")


def personal_summary(res: dict) -> list[str]:
    """The printed summary: each model's accuracy per group, the few-shot verdict and each group's gold scores."""
    acc, pol, few = res["reward_models"], res["policies"], res["fewshot"]["groups"]
    groups = list(few)
    lines = ["held-out accuracy against each group's gold (its labels):"]
    for model in ("single", "personalized (group head)", "personalized (population head)"):
        lines.append(f"  {model:32s}" + "  ".join(f"{g} {acc[model][g]['gold']:.3f} ({acc[model][g]['labels']:.3f})"
                                                for g in groups))
    lines.append("few-shot, new users (their labels): " + "; ".join(
        f"{g}: k=0 {few[g]['0']['labels']:.3f} -> k={k} {few[g][k]['labels']:.3f}, beats the population model from "
        f"k={few[g]['needed']['labels']}" for g in groups for k in [max((x for x in few[g] if x.isdigit()), key=int)]))
    lines.append("mean gold score of each group: " + "; ".join(
        f"{g}: SFT {pol['SFT'][f'gold/{g}']:.2f}, generic {pol['generic policy'][f'gold/{g}']:.2f}, personalized "
        f"{pol[f'personalized policy <user:{g}>'][f'gold/{g}']:.2f}" for g in groups))
    lines.append(res["verdict"])
    return lines
