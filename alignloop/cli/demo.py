"""`alignloop demo`, `alignloop eval` and `alignloop pipeline`."""
from __future__ import annotations

import json
import secrets
from pathlib import Path

import click


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


def _human_summary(result: dict) -> None:
    if result.get("stopped") == "human":
        return
    _echo("")
    _echo(f"run folder:    {result['run']}")
    _echo(f"SFT model:     {result['sft']}")
    _echo(f"reward model:  {result['reward_model']}")
    for name, path in result.get("policies", {}).items():
        if name != "SFT":
            _echo(f"{name + ' model:':<15}{path}")
    _echo(f"report:        {result['report']}  (and report.md, plots/)")
    summ = result.get("results") or {}
    if summ:
        _echo("")
        _echo(f"{'method':<14}{'gold':>8}{'win vs SFT':>12}{'RM':>8}{'KL':>8}")
        for name, s in summ.items():
            _echo(f"{name:<14}{s.get('gold/mean', float('nan')):>8.2f}{s.get('gold/win_rate', float('nan')):>12.2f}"
                  f"{s.get('rm/mean', float('nan')):>8.2f}{s.get('kl', float('nan')):>8.2f}")
    for n in result.get("notes", []):
        _echo(f"note: {n}")


def _serve_for_human(db: str, project: str, host: str, port: int, serve: bool, resume_cmd: str) -> None:
    from alignloop.feedback.store import Store

    store = Store(db)
    password = secrets.token_urlsafe(9)
    names = {lab.username for lab in store.list_labelers()}
    user = "you"
    if user not in names:
        store.add_labeler(user, password, role="admin")
        cred = f"user '{user}', password '{password}'"
    else:
        cred = f"user '{user}' (password set on the first run)"
    store.dispose()
    _echo("")
    _echo(f"Sampling done: project '{project}' in {db} is ready to label.")
    if not serve:
        _echo(f"Serve the labeling app with: alignloop feedback serve --db {db} --host {host} --port {port}")
    _echo(f"Log in at http://{host}:{port} as {cred}. Add more labelers with: "
          f"alignloop feedback add-labeler --db {db} NAME")
    _echo(f"When you are done, stop the server (Ctrl-C) and run: {resume_cmd}")
    if serve:
        import uvicorn

        from alignloop.feedback.app import create_app

        uvicorn.run(create_app(Store(db)), host=host, port=port, log_level="warning")


@click.command(help="Run the whole loop on a built-in toy task (short movie reviews) on CPU with no downloads: "
                    "pretrain a small LM, SFT, sample into the feedback store, simulated labelers, reward model, "
                    "PPO, DPO, best-of-N, rejection sampling, evaluation and an HTML/Markdown report.")
@click.option("--output-dir", default="runs/demo", show_default=True, help="The run folder.")
@click.option("--quick", is_flag=True, help="Reduced sizes (a few minutes; what the tests run).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--human", is_flag=True, help="Stop after sampling and serve the labeling app for people to judge; "
                                            "then run `alignloop demo --resume`.")
@click.option("--resume", is_flag=True, help="Continue a run: finished stages are skipped.")
@click.option("--host", default="127.0.0.1", show_default=True, help="--human: where to serve the app.")
@click.option("--port", type=int, default=8000, show_default=True, help="--human: port of the app.")
@click.option("--no-serve", is_flag=True, hidden=True, help="--human: prepare but do not start the server.")
@click.option("--threads", type=int, default=None,
              help="Torch CPU threads (default: all cores on an idle machine, 1 on a busy one).")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="Rounds of sample -> label -> reward model -> PPO, each sampling from the last PPO policy.")
def demo(output_dir, quick, seed, human, resume, host, port, no_serve, threads, rounds):
    from alignloop.demo.demo import DemoSize, run_demo

    out = Path(output_dir)
    if not resume and (out / "demo.json").exists():
        _echo(f"{out} holds an earlier run: finished stages are reused (use another --output-dir to start over)")
    size = DemoSize.quick() if quick else DemoSize()
    result = run_demo(out, size, seed=seed, human=human, resume=resume, echo=_echo, threads=threads,
                      rounds=rounds)
    if result.get("stopped") == "human":
        click.echo(json.dumps({"stopped": "human", "db": result["db"], "project": result["project"]}))
        _serve_for_human(result["db"], result["project"], host, port, not no_serve,
                         f"alignloop demo --resume --output-dir {output_dir}")
        return
    click.echo(json.dumps({k: result[k] for k in ("run", "sft", "reward_model", "policies", "report")}))
    _human_summary(result)


@click.command(name="eval", help="Evaluate a policy against a reference on prompts: win rate judged by a reward "
                                 "model and/or a Python gold function, KL to the reference, reward, length. "
                                 "--human-db also imports (policy, reference) pairs for people to judge in the app; "
                                 "--tally then reports the people's win rate.")
@click.option("--policy", default=None, help="Policy model (hub id or local folder).")
@click.option("--reference", default=None, help="Reference model, e.g. the SFT model (same tokenizer).")
@click.option("--prompts", "prompts_file", default=None, help="Prompt file (rows with a 'prompt' field).")
@click.option("--reward-model", default=None, help="Reward model judging the win rate (local folder or hub id).")
@click.option("--gold", default=None, help="Gold scorer module:function, f(prompts, responses) -> list[float].")
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
def eval_cmd(policy, reference, prompts_file, reward_model, gold, samples_per_prompt, max_new_tokens, temperature,
             max_prompts, seed, out, human_db, human_project, tally):
    from alignloop.evaluation import evaluate_policy, people_win_rate
    from alignloop.scoring import load_function, load_scorer
    from alignloop.demo.pipeline import read_prompts, write_jsonl
    from alignloop.errors import UserError

    if tally:
        if not human_db:
            raise UserError("--tally needs --human-db (and --human-project)")
        from alignloop.feedback.store import Store

        store = Store(human_db, create=False)
        try:
            click.echo(json.dumps({"project": human_project, **people_win_rate(store, human_project)}))
        finally:
            store.dispose()
        return
    missing = [f"--{n}" for n, v in (("policy", policy), ("reference", reference), ("prompts", prompts_file)) if not v]
    if missing:
        raise UserError(f"missing {', '.join(missing)}")
    if reward_model is None and gold is None and human_db is None:
        raise UserError("give a judge: --reward-model, --gold module:function, or --human-db")
    prompts = read_prompts(prompts_file)
    if max_prompts:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise UserError(f"{prompts_file}: no prompts")
    rm = load_scorer(reward_model, batch_size=64) if reward_model else None
    gold_fn = load_function(gold) if gold else None
    summary, s, ref = evaluate_policy(policy, reference, prompts, rm=rm, gold=gold_fn, n=samples_per_prompt,
                                      max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    summary = {"policy": policy, "reference": reference, **summary}
    for k in ("gold", "rm"):
        if k in ref.scores:
            summary[f"reference/{k}/mean"] = sum(ref.scores[k]) / len(ref.scores[k])
    if out:
        rows = [{**r, "reference_response": rr["response"], **{f"reference_{k}": rr[k] for k in ("gold", "rm")
                                                               if k in rr}}
                for r, rr in zip(s.to_rows(), ref.to_rows())]
        write_jsonl(rows, Path(out))
        Path(out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    if human_db:
        from alignloop.feedback.store import Store

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
                for p, a, b in zip(s.prompts, s.responses, ref.responses) if a != b]
            res = store.import_records(human_project, rows)
            summary["human"] = {"db": human_db, "project": human_project, "items": res.items,
                                "next": f"alignloop feedback serve --db {human_db}; then alignloop eval --tally "
                                        f"--human-db {human_db} --human-project {human_project}"}
        finally:
            store.dispose()
    click.echo(json.dumps(summary))


@click.command(help="Run the whole loop on your own models and data from a YAML file (see examples/pipeline.yaml): "
                    "SFT, sampling into the feedback store, labeling (simulated judges of a gold function, or people "
                    "in the app), reward model, PPO (several rounds), DPO, best-of-N, rejection sampling, evaluation "
                    "and a report. Every stage is resumable: run the same command again to continue.")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--output-dir", default=None, help="Override the run folder of the file.")
@click.option("--rounds", type=int, default=None, help="Override the number of collect → RM → PPO rounds.")
@click.option("--human", is_flag=True, help="Stop after the first sampling so people can label in the app.")
@click.option("--threads", type=int, default=None,
              help="Torch CPU threads (default: all cores on an idle machine, 1 on a busy one).")
def pipeline(config, output_dir, rounds, human, threads):
    from alignloop.demo.demo import set_threads
    from alignloop.demo.pipeline import PipelineConfig, run_pipeline

    set_threads(threads)
    cfg = PipelineConfig.from_yaml(config)
    if output_dir:
        cfg.output_dir = output_dir
    if rounds:
        cfg.rounds = rounds
    if human:
        cfg.human_stop = True
        cfg.feedback.labelers = "human"
    result = run_pipeline(cfg, echo=_echo)
    if result.get("stopped") == "human":
        click.echo(json.dumps(result))
        _serve_for_human(result["db"], result["project"], "127.0.0.1", 8000, False,
                         f"alignloop pipeline {config}" + (f" --output-dir {output_dir}" if output_dir else ""))
        return
    click.echo(json.dumps({k: result[k] for k in ("run", "sft", "reward_model", "policies", "report")}))
    _human_summary(result)
