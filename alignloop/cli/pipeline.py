"""`alignloop pipeline`, and what it shares with `alignloop demo`: the closing summary, serving the app for people."""
from __future__ import annotations

import json
import secrets

import click

from alignloop.feedback.store import Store
from alignloop.pipeline import PipelineConfig, run_pipeline
from alignloop.training import set_threads


def echo(msg: str) -> None:
    click.echo(msg, err=True)


def print_summary(result: dict) -> None:
    if result.get("stopped") == "human":
        return
    echo("")
    echo(f"run folder:    {result['run']}")
    echo(f"SFT model:     {result['sft']}")
    echo(f"reward model:  {result['reward_model']}")
    for name, path in result.get("policies", {}).items():
        if name != "SFT":
            echo(f"{name + ' model:':<15}{path}")
    echo(f"report:        {result['report']}  (and report.md, plots/)")
    summ = result.get("results") or {}
    if summ:
        echo("")
        echo(f"{'method':<14}{'gold':>8}{'win vs SFT':>12}{'RM':>8}{'KL':>8}")
        for name, s in summ.items():
            echo(f"{name:<14}{s.get('gold/mean', float('nan')):>8.2f}{s.get('gold/win_rate', float('nan')):>12.2f}"
                  f"{s.get('rm/mean', float('nan')):>8.2f}{s.get('kl', float('nan')):>8.2f}")
    for n in result.get("notes", []):
        echo(f"note: {n}")


# what people do in the app, by the project's task type
WHAT_TO_DO = {
    "demonstration": "write the response the assistant should give to each prompt (or edit the sampled answer "
                     "shown); SFT trains on what you write",
    "conversation": "talk with the model: send a message, pick the better of its two replies on the 8-point scale "
                    "(keys 1-8), continue from it, and end each conversation with a 1-7 rating; the reward model "
                    "trains on your choices",
}


def serve_for_human(db: str, project: str, host: str, port: int, serve: bool, resume_cmd: str) -> None:
    """Make the person's admin account, print what to do and how to resume, and serve the app (`serve`). The app
    builds its generation worker on the first conversation turn, so a conversation project is served as it is."""
    store = Store(db)
    task = store.get_project(project).task_type
    password = secrets.token_urlsafe(9)
    names = {lab.username for lab in store.list_labelers()}
    user = "you"
    if user not in names:
        store.add_labeler(user, password, role="admin")
        cred = f"user '{user}', password '{password}'"
    else:
        cred = f"user '{user}' (password set on the first run)"
    store.dispose()
    echo("")
    if task in WHAT_TO_DO:
        echo(f"Project '{project}' ({task}) in {db} is ready: {WHAT_TO_DO[task]}.")
    else:
        echo(f"Sampling done: project '{project}' in {db} is ready to label.")
    if not serve:
        echo(f"Serve the labeling app with: alignloop feedback serve --db {db} --host {host} --port {port}")
    echo(f"Log in at http://{host}:{port} as {cred}. Add more labelers with: "
          f"alignloop feedback add-labeler --db {db} NAME")
    echo(f"When you are done, stop the server (Ctrl-C) and run: {resume_cmd}")
    if serve:
        import uvicorn  # noqa: PLC0415 - the web extra: only `serve` needs it

        from alignloop.feedback.app import create_app  # noqa: PLC0415 - the web extra: only `serve` needs it

        uvicorn.run(create_app(Store(db)), host=host, port=port, log_level="warning")


@click.command(help="Run the whole loop on your own models and data from a YAML file (see examples/pipeline.yaml): "
                    "SFT, sampling into the feedback store, labeling (simulated judges of a gold function, or people "
                    "in the app), reward model, PPO (several rounds), DPO, best-of-N, rejection sampling, evaluation "
                    "and a report. Every stage is resumable: run the same command again to continue.")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--output-dir", default=None, help="Override the run folder of the file.")
@click.option("--rounds", type=int, default=None, help="Override the number of collect → RM → PPO rounds.")
@click.option("--human", is_flag=True, help="Stop after the first sampling so people can label in the app (people "
                                            "are the labelers: feedback.labelers human).")
@click.option("--threads", type=int, default=None,
              help="Torch CPU threads (default: all cores on an idle machine, 1 on a busy one).")
def pipeline(config, output_dir, rounds, human, threads):
    set_threads(threads)
    cfg = PipelineConfig.from_yaml(config, human=human)
    if output_dir:
        cfg.output_dir = output_dir
    if rounds:
        cfg.rounds = rounds
    if human:
        cfg.human_stop = True
        cfg.feedback.labelers = "human"
    result = run_pipeline(cfg, echo=echo)
    if result.get("stopped") == "human":
        click.echo(json.dumps(result))
        serve_for_human(result["db"], result["project"], "127.0.0.1", 8000, False,
                         f"alignloop pipeline {config}" + (f" --output-dir {output_dir}" if output_dir else ""))
        return
    click.echo(json.dumps({k: result[k] for k in ("run", "sft", "reward_model", "policies", "report")}))
    print_summary(result)
