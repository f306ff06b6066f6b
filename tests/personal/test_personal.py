"""Few-shot personalization: the fit of a user's weights over the heads (hand-worked cases), the profiles file, and
`alignloop personalize` on a trained group-head reward model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from alignloop.cli import cli
from alignloop.data import load_preferences
from alignloop.errors import UserError
from alignloop.models import RewardModel, load_tokenizer
from alignloop.personal import (
    UserProfiles,
    fit_user_weights,
    head_diffs,
    personalize,
    population_weights,
)
from alignloop.trainers.rm import RewardConfig, RewardTrainer

from .personal_rows import two_group_rows, write_jsonl


def _gradient(d, w, prior, l2):
    """∂L/∂w of Σ −log σ(w·d_i) + l2/2 ‖w − prior‖² (zero at the fit)."""
    d, w, prior = (torch.as_tensor(x, dtype=torch.float64) for x in (d, w, prior))
    return -(d * torch.sigmoid(-(d @ w))[:, None]).sum(0) + l2 * (w - prior)


def test_no_judgements_give_the_prior():
    prior = torch.tensor([0.2, 0.5, 0.3])
    assert torch.equal(fit_user_weights(torch.zeros(0, 3), prior, 1.0), prior.double())


def test_one_head_explains_the_judgements_the_other_says_nothing():
    """d = (1, 0) four times, prior 0, l2 = 1: head 1 stays at 0 exactly; head 0 is the root of 4σ(−x) = x
    (≈ 1.0426, as the module docstring works out)."""
    w = fit_user_weights(torch.tensor([[1.0, 0.0]] * 4), torch.zeros(2), 1.0)
    assert w[1].item() == 0.0
    assert w[0].item() == pytest.approx(4 * torch.sigmoid(-w[0]).item(), abs=1e-12)
    assert w[0].item() == pytest.approx(1.0426, abs=1e-4)
    # more judgements: further from the prior; a stronger pull: nearer it
    assert fit_user_weights(torch.tensor([[1.0, 0.0]] * 16), torch.zeros(2), 1.0)[0] > w[0]
    assert fit_user_weights(torch.tensor([[1.0, 0.0]] * 4), torch.zeros(2), 10.0)[0] < w[0]


def test_contradictory_judgements_cancel():
    prior = torch.tensor([0.5, 0.5])
    d = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])        # prior · d = 0 for both
    assert torch.allclose(fit_user_weights(d, prior, 1.0), prior.double(), atol=1e-12)


def test_weights_move_to_the_head_that_explains_the_user():
    """Head 0's difference always favours the chosen completion, head 2's always opposes it, head 1's is noise
    (each value once with each sign: symmetric about 0, so it says nothing about the user): from the uniform prior
    the fit raises head 0 and lowers head 2 far more than it moves head 1, whose weight the noise can only shrink
    (toward 0, never past it); the fitted weights order every judgement right; and the gradient there is zero."""
    g = torch.Generator().manual_seed(0)
    n = 15
    good, noise = torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    bad = -(torch.rand(n, generator=g) + 0.1)
    d = torch.cat([torch.stack([good, noise, bad], 1), torch.stack([good, -noise, bad], 1)])
    prior = torch.full((3,), 1 / 3)
    w = fit_user_weights(d, prior, 0.5)
    assert w[0] > prior[0] + 1.0 and w[2] < prior[2] - 1.0
    assert 0.0 <= w[1] <= prior[1]
    assert ((d.double() @ w) > 0).all()
    assert _gradient(d, w, prior, 0.5).abs().max() < 1e-9
    assert torch.equal(fit_user_weights(d, prior, 0.5), w)          # deterministic


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError, match="l2 must be > 0"):
        fit_user_weights(torch.ones(2, 2), torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match=r"\[n, H\]"):
        fit_user_weights(torch.ones(2, 3), torch.zeros(2), 1.0)


def test_profiles_round_trip_and_errors(tmp_path):
    heads = {"by": "group", "names": ["cool", "warm", "population"], "population": "population"}
    profiles = UserProfiles(heads["names"], population_weights(heads))
    assert profiles.population == {"cool": 0.0, "warm": 0.0, "population": 1.0}
    assert population_weights(heads | {"population": None}) == {"cool": 1 / 3, "warm": 1 / 3, "population": 1 / 3}
    profiles.set_user("ann", {"warm": 0.9, "population": 0.1}, 5, "warm")
    path = profiles.save(tmp_path)                                  # a folder: user_profiles.json in it
    assert path.name == "user_profiles.json"
    data = json.loads(path.read_text())
    assert data == {"heads": ["cool", "warm", "population"], "population": {"cool": 0.0, "warm": 0.0,
                                                                             "population": 1.0},
                    "users": {"ann": {"weights": {"cool": 0.0, "warm": 0.9, "population": 0.1}, "n": 5,
                                      "group": "warm"}}}
    assert UserProfiles.load(tmp_path) == profiles
    with pytest.raises(UserError, match="no such user profiles file"):
        UserProfiles.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text, message in [("{", "not readable JSON"), ("[]", "expected an object"),
                          ('{"heads": [], "population": {}}', "'heads'"),
                          ('{"heads": ["a"], "population": {"b": 1}}', r"'population': 'b' not among the heads"),
                          ('{"heads": ["a"], "population": {"a": 1}, "users": {"u": {"weights": {"a": "x"}}}}',
                           r"user 'u': 'weights': the weight of 'a' is not a number"),
                          ('{"heads": ["a"], "population": {"a": 1}, "users": {"u": {"weights": {}, "n": -1}}}',
                           r"user 'u': 'n'")]:
        bad.write_text(text)
        with pytest.raises(UserError, match=message):
            UserProfiles.load(bad)
    with pytest.raises(UserError, match="not among the heads"):
        profiles.set_user("bob", {"hot": 1.0}, 1)


@pytest.fixture(scope="module")
def group_rm(tmp_path_factory, base_model):
    """A group-head reward model (cool, warm, population) trained on the two opposite groups."""
    d = tmp_path_factory.mktemp("group_rm")
    train = write_jsonl(d / "train.jsonl", two_group_rows(120, 30, "warm") + two_group_rows(120, 31, "cool"))
    cfg = RewardConfig(output_dir=str(d / "rm"), learning_rate=2e-3, num_epochs=3, per_device_batch_size=16,
                       max_length=32, heads_by="group", population_head=True, progress=False, tensorboard=False)
    return RewardTrainer(model=base_model, train_dataset=train, args=cfg).train().output_dir


def test_personalize_fits_a_new_user_from_their_judgements(tmp_path, group_rm):
    """A new labeler (no group given) whose few judgements are a warm person's: the fit moves their weights from the
    population head toward the warm head, and `alignloop personalize` writes exactly that fit."""
    rows = [r | {"labeler": "ann"} for r in two_group_rows(8, 40, "warm")]
    for r in rows:
        del r["labeler_attributes"]
    data = write_jsonl(tmp_path / "ann.jsonl", rows)
    out = tmp_path / "profiles.json"
    result = CliRunner().invoke(cli, ["personalize", "--reward-model", group_rm, "--train-file", data,
                                      "--output", str(out), "--l2", "1.0"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output[result.output.index('{"user"'):])      # after any progress bar
    assert line["user"] == "ann" and line["n"] == 8 and line["group"] is None
    w = UserProfiles.load(out).users["ann"].weights
    assert w["warm"] > w["cool"] + 0.5, w
    # the same numbers by hand: head differences of the user's pairs, the population prior
    rm = RewardModel.from_pretrained(group_rm)
    diffs = head_diffs(rm, load_tokenizer(group_rm), load_preferences(data)[0])
    assert diffs.shape == (8, 3)
    expected = fit_user_weights(diffs, [0.0, 0.0, 1.0], 1.0)
    assert [w[h] for h in ("cool", "warm", "population")] == pytest.approx(expected.tolist(), abs=1e-5)
    # on ann's other (warm) judgements, her weights beat the population model's, which cannot tell warm from cool
    held = head_diffs(rm, load_tokenizer(group_rm), load_preferences(two_group_rows(40, 42, "warm"))[0])
    mine = (held.double() @ expected > 0).double().mean().item()
    population = (held[:, 2] > 0).double().mean().item()
    assert mine > 0.85 and mine > population + 0.2, (mine, population)
    # a second user joins the same file; the first stays
    cool = write_jsonl(tmp_path / "bo.jsonl", two_group_rows(6, 41, "cool"))
    user, profile, _ = personalize(group_rm, cool, user="Lcool1", output=out)
    assert user == "Lcool1" and profile.group == "cool" and set(UserProfiles.load(out).users) == {"ann", "Lcool1"}
    assert profile.n == sum(r["labeler"] == "Lcool1" for r in two_group_rows(6, 41, "cool"))
    # a known group: the prior is the group's head, so even 0 useful judgements leave the user on it
    assert profile.weights["cool"] > profile.weights["warm"]


def test_personalize_errors(tmp_path, base_model, group_rm):
    data = write_jsonl(tmp_path / "mixed.jsonl", two_group_rows(4, 50, "warm"))    # several labelers
    with pytest.raises(UserError, match="name the user"):
        personalize(group_rm, data, output=tmp_path / "p.json")
    with pytest.raises(UserError, match="no row has labeler 'zed'"):
        personalize(group_rm, data, user="zed", output=tmp_path / "p.json")
    one = tmp_path / "one"
    RewardModel.from_pretrained(base_model).save_pretrained(one)
    with pytest.raises(UserError, match="one-head reward model"):
        personalize(one, data, user="x")
    out = subprocess.run([sys.executable, "-m", "alignloop.cli", "personalize", "--reward-model", str(one),
                          "--train-file", data], capture_output=True, text=True)
    assert out.returncode == 2 and "one-head reward model" in out.stderr and "Traceback" not in out.stderr
