"""The `alignloop` console script.

Sub-commands live in their own modules and are imported only when used (so `alignloop --help` is fast).
User mistakes (`alignloop.errors.UserError`) are printed as `error: ...` without a traceback, exit status 2.
Third-party noise (load reports, weight-loading bars, deprecation warnings) is shown only with `--verbose`
(`alignloop.cli.console`).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from alignloop.cli.console import VERBOSE_HELP, configure_console, wants_verbose
from alignloop.errors import UserError

# name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("alignloop.cli.demo", "demo", "Run the whole loop on the built-in example task (no downloads)."),
    "sft": ("alignloop.cli.train", "sft", "Supervised fine-tuning on demonstrations (loss on completions only)."),
    "rm": ("alignloop.cli.train", "rm", "Train a reward model on preference pairs or rankings (Bradley-Terry)."),
    "personalize": ("alignloop.cli.personalize", "personalize",
                    "Fit a user's weights over a multi-head reward model's heads from a few of their judgements."),
    "prm": ("alignloop.cli.prm", "prm", "Train a process reward model on step-level labels (or an ORM: --outcome)."),
    "ppo": ("alignloop.cli.ppo", "ppo", "PPO against a reward model with a KL penalty to the reference."),
    "grpo": ("alignloop.cli.grpo", "grpo", "Critic-free RL: GRPO, Dr. GRPO, RLOO or REINFORCE (--estimator)."),
    "rloo": ("alignloop.cli.grpo", "rloo", "RLOO: each completion's baseline is its prompt's other completions."),
    "dpo": ("alignloop.cli.dpo", "dpo", "Direct preference optimisation (no reward model)."),
    "online-dpo": ("alignloop.cli.online_dpo", "online_dpo",
                   "Online DPO: two fresh completions per prompt, judged by the reward, a DPO step."),
    "kto": ("alignloop.cli.kto", "kto", "KTO on thumbs up / down (unpaired) data (no reward model)."),
    "generate": ("alignloop.cli.dpo", "generate", "Sample completions; --best-of N keeps the reward model's best."),
    "rs": ("alignloop.cli.dpo", "rs", "Rejection-sampling fine-tuning: sample, score, keep the best, SFT, repeat."),
    "cai": ("alignloop.cli.cai", "cai",
            "Constitutional AI, supervised stage: critique and revise responses against principles; SFT data."),
    "judge": ("alignloop.cli.judge", "judge",
              "AI labeler: judge a feedback project's pairs against a constitution (a labeler of kind ai)."),
    "eval": ("alignloop.cli.evaluate", "eval_cmd", "Win rate, reward, KL and length of a policy against a reference."),
    "pipeline": ("alignloop.cli.pipeline", "pipeline",
                 "Run the whole loop on your own models and data from a YAML file."),
    "label-steps": ("alignloop.cli.label_steps", "label_steps", "Math-Shepherd step labels by rollouts."),
    "data": ("alignloop.cli.data", "data", "Validate and convert datasets (rankings -> pairs, formats)."),
    "feedback": ("alignloop.cli.feedback", "feedback",
                 "The human-feedback labeling app: serve, import, stats, export."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [n for n, (mod, _, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        mod, attr, _ = COMMANDS[name]
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                return None
            raise
        return with_verbose_option(getattr(module, attr, None))

    def format_commands(self, ctx, formatter):
        rows = [(n, COMMANDS[n][2]) for n in self.list_commands(ctx)]
        if not rows:
            return
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _verbose_option() -> click.Option:
    # read before the command runs (`wants_verbose` in `main`); the option makes it valid and documented
    return click.Option(["--verbose"], is_flag=True, expose_value=False, help=VERBOSE_HELP)


def with_verbose_option(command: click.Command | None) -> click.Command | None:
    """Every command (and a group's sub-commands) accepts `--verbose`."""
    if command is None:
        return None
    if not any(p.name == "verbose" for p in command.params):
        command.params.append(_verbose_option())
    for sub in getattr(command, "commands", {}).values():
        with_verbose_option(sub)
    return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="alignloop")
@click.option("--verbose", is_flag=True, expose_value=False, help=VERBOSE_HELP)
def cli():
    """alignloop: the whole RLHF loop, from a base model and prompts to a model aligned with human preferences."""


# the packages of the `web` extra (pyproject.toml): a command that needs one says how to install it
WEB_EXTRA = {"fastapi", "jinja2", "multipart", "sqlalchemy", "alembic", "uvicorn", "argon2", "itsdangerous", "sklearn",
             "krippendorff", "markdown_it", "psycopg"}


def _end_distributed() -> None:
    """Under `accelerate launch` / torchrun: leave the process group before the interpreter exits. A process that
    exits with gloo's threads still running can abort ("terminate called without an active exception") and fail
    the whole launch after a run that finished."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    configure_console(wants_verbose(sys.argv[1:] if argv is None else list(argv)))
    try:
        try:
            cli.main(args=argv, prog_name="alignloop", standalone_mode=False)
        finally:
            _end_distributed()
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in WEB_EXTRA:
            raise
        click.echo(f"error: this command needs the web extra (the feedback store and app; missing module "
                   f"{e.name!r}): pip install 'alignloop[web]'", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
