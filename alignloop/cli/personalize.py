"""`alignloop personalize`: fit one user's weights over a multi-head reward model's heads from a handful of their
judgements (`alignloop.personal`), and add them to the profiles beside the model.

    alignloop personalize --reward-model runs/rm/final --train-file ann.jsonl [--user ann] [--l2 1.0]

--train-file: the user's preferences (any preference or ranking format; with a `labeler` column, --user picks that
labeler's rows, and without --user the rows must have one labeler). Writes `user_profiles.json` in the model folder
(or --output), which `alignloop.scoring` reads for prompts tagged with the user. Prints one JSON line.
"""
from __future__ import annotations

import json

import click

from alignloop.personal import personalize as fit_profile


@click.command("personalize", help=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
               context_settings={"max_content_width": 120})
@click.option("--reward-model", required=True, type=click.Path(file_okay=False),
              help="A multi-head reward model folder (alignloop rm --heads-by ...).")
@click.option("--train-file", required=True, help="The user's preferences (pairs or rankings).")
@click.option("--user", default=None, help="The user's name (default: the rows' one labeler).")
@click.option("--l2", type=float, default=1.0, show_default=True,
              help="Pull toward the prior (the user's group head, else the population's weights): larger keeps a "
                   "user with few judgements nearer the population.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="The profiles file (default: REWARD_MODEL/user_profiles.json); other users in it are kept.")
@click.option("--score-batch-size", type=int, default=16, show_default=True, help="Groups scored per forward.")
@click.option("--max-length", type=int, default=None, help="Truncate as the reward model's training did.")
@click.option("--add-eos/--no-add-eos", default=True, show_default=True,
              help="Append EOS to completions, as the reward model's training did.")
def personalize(reward_model, train_file, user, l2, output, score_batch_size, max_length, add_eos):
    name, profile, path = fit_profile(reward_model, train_file, user=user, l2=l2, output=output,
                                      score_batch_size=score_batch_size, max_length=max_length, add_eos=add_eos)
    click.echo(json.dumps({"user": name, "n": profile.n, "group": profile.group, "weights": profile.weights,
                           "profiles": str(path)}))
