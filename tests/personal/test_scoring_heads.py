"""Multi-head reward models through `alignloop.scoring`: one part per head (checked against the model called
directly), the head-weight spec and its errors, one forward per batch for every head, the population default, and
per-row (per-user) weights from prompt tags: a profiled user, a user named like a head, a profiled user's group head,
an unknown user and an untagged prompt (the population)."""
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alignloop.data import reward_input_ids, tag_prompt
from alignloop.errors import ConfigError
from alignloop.models.tiny import build_tiny_checkpoint, train_tokenizer
from alignloop.personal import UserProfiles
from alignloop.scoring import (
    HeadWeights,
    UserTagScorer,
    WeightedScorer,
    build_scorer,
    load_scorer,
    score_with_parts,
    split_heads,
    total,
    weights_for,
)

from . import heads_fixtures
from .heads_fixtures import build_heads_model

PROMPTS = ["the movie was", "a story", "this film is", "the plot and"]
COMPLETIONS = [" very good fun", " awful", " not boring really", " great music"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(vocab_size=300)


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory, tok):
    return build_heads_model(tmp_path_factory.mktemp("two_heads"), tok)


@pytest.fixture(scope="module")
def with_population(tmp_path_factory, tok):
    """Heads helpful, harmless and population (the population head), user profiles beside it."""
    profiles = {"heads": ["helpful", "harmless", "population"], "population": {"population": 1.0},
                "users": {"alice": {"weights": {"helpful": 0.9, "harmless": 0.1}, "n": 12, "group": "harmless"},
                          "carol": {"weights": {"population": 1.0}, "n": 0, "group": "harmless"},
                          "dave": {"weights": {"population": 1.0}, "n": 0, "group": "nobody"}}}
    return build_heads_model(tmp_path_factory.mktemp("pop_heads"), tok, heads=("helpful", "harmless", "population"),
                             population="population", by="group", seed=1, profiles=profiles)


def direct_head_scores(folder, tok, prompts, completions):
    """[B, H]: each (prompt, completion) tokenised as reward-model training does, through the transformers model
    alone, one unpadded sequence at a time."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    seqs = reward_input_ids(tok, prompts, completions, True, None)
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([s])).logits[0] for s in seqs])


def test_one_part_per_head_matches_the_model_and_weights_default_to_equal(two_heads, tok):
    scorer = load_scorer(two_heads, batch_size=3)
    parts = scorer.parts(PROMPTS, COMPLETIONS)
    want = direct_head_scores(two_heads, tok, PROMPTS, COMPLETIONS)
    assert list(parts) == ["helpful", "harmless"]
    torch.testing.assert_close(parts["helpful"], want[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["harmless"], want[:, 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(parts["helpful"], parts["harmless"])   # two heads, not one read twice
    assert scorer.weights == {"helpful": 0.5, "harmless": 0.5}       # no population head: the heads' mean
    torch.testing.assert_close(scorer(PROMPTS, COMPLETIONS), want.mean(1), atol=1e-5, rtol=1e-5)


def test_spec_weights_select_and_weigh_heads(two_heads, tok):
    want = direct_head_scores(two_heads, tok, PROMPTS, COMPLETIONS)
    weighted = load_scorer(f"{two_heads}:helpful=0.7,harmless=0.3")
    assert weighted.weights == {"helpful": 0.7, "harmless": 0.3}
    torch.testing.assert_close(weighted(PROMPTS, COMPLETIONS), 0.7 * want[:, 0] + 0.3 * want[:, 1], atol=1e-5,
                               rtol=1e-5)
    alone = load_scorer(f"{two_heads}:harmless")
    assert alone.weights == {"helpful": 0.0, "harmless": 1.0}
    assert set(alone.parts(PROMPTS, COMPLETIONS)) == {"helpful", "harmless"}   # every head still logged
    torch.testing.assert_close(alone(PROMPTS, COMPLETIONS), want[:, 1], atol=1e-5, rtol=1e-5)


def test_population_head_is_the_default(with_population, tok):
    scorer = load_scorer(with_population)
    assert scorer.weights == {"helpful": 0.0, "harmless": 0.0, "population": 1.0}
    want = direct_head_scores(with_population, tok, PROMPTS, COMPLETIONS)
    torch.testing.assert_close(scorer(PROMPTS, COMPLETIONS), want[:, 2], atol=1e-5, rtol=1e-5)


def test_head_spec_errors_name_the_heads(two_heads, tmp_path, tok):
    with pytest.raises(ConfigError, match="kindness.*its heads: helpful, harmless"):
        load_scorer(f"{two_heads}:kindness=1")
    for bad, match in ((":helpful=abc", "weight of head 'helpful' must be a number"),
                       (":helpful=inf", "finite"), (":helpful=1,helpful=2", "each head named once"),
                       (":=1", "each head named once")):
        with pytest.raises(ConfigError, match=match):
            load_scorer(two_heads + bad)
    one_head = build_tiny_checkpoint(tmp_path / "rm", kind="reward", tokenizer=tok, n_layer=1, n_embd=16, n_head=2)
    with pytest.raises(ConfigError, match="multi-head"):
        load_scorer(f"{one_head}:helpful=1")


def test_split_heads_leaves_other_specs_alone(two_heads):
    assert split_heads("mypkg.rewards:exact_match") == ("mypkg.rewards:exact_match", None)
    assert split_heads("mypkg.rewards:exact_match=0.5") == ("mypkg.rewards:exact_match=0.5", None)
    assert split_heads(two_heads) == (two_heads, None)
    assert split_heads("runs/rm/final=0.5") == ("runs/rm/final=0.5", None)
    assert split_heads("org/rm:helpful=0.25, harmless") == ("org/rm", {"helpful": 0.25, "harmless": 1.0})


def test_one_forward_per_batch_for_all_heads(two_heads):
    scorer = load_scorer(two_heads, batch_size=2)
    calls = []
    scorer.model.transformer.register_forward_hook(lambda *_: calls.append(1))
    scorer.parts(PROMPTS, COMPLETIONS)
    assert len(calls) == 2                      # 4 rows, 2 per forward, both heads from each
    calls.clear()
    summed = load_scorer([f"{two_heads}:helpful=0.7,harmless=0.3",
                          "personal.heads_fixtures:recording_reward=2"], batch_size=4)
    assert isinstance(summed, WeightedScorer)
    summed.members[0][0].model.transformer.register_forward_hook(lambda *_: calls.append(1))
    scores, parts = score_with_parts(summed, PROMPTS, COMPLETIONS)
    assert len(calls) == 1 and list(parts) == ["helpful", "harmless", "recording_reward"]
    assert summed.weights == {"helpful": 0.7, "harmless": 0.3, "recording_reward": 2.0}
    torch.testing.assert_close(scores, 0.7 * parts["helpful"] + 0.3 * parts["harmless"])


def test_per_row_user_weights(with_population, tok):
    scorer = load_scorer(with_population, user_tag="<user:{user}> ")
    assert isinstance(scorer, UserTagScorer)
    users = ["alice", "harmless", "carol", "zed", None, "dave"]
    prompts = [tag_prompt(p, u) for p, u in zip(PROMPTS + PROMPTS[:2], users, strict=True)]
    completions = COMPLETIONS + COMPLETIONS[:2]
    weights = weights_for(scorer, prompts)
    rows = torch.stack([weights[h] for h in ("helpful", "harmless", "population")], 1)
    expected = torch.tensor([[0.9, 0.1, 0.0],    # alice: her fitted weights (not her group's head)
                             [0.0, 1.0, 0.0],    # a user named like a head: that head
                             [0.0, 1.0, 0.0],    # carol: no judgements yet (n = 0), her group's head
                             [0.0, 0.0, 1.0],    # unknown user: cold start, the population
                             [0.0, 0.0, 1.0],    # untagged prompt: the population
                             [0.0, 0.0, 1.0]])   # dave: n = 0, a group that is no head: his stored prior
    torch.testing.assert_close(rows, expected)
    want = direct_head_scores(with_population, tok, PROMPTS + PROMPTS[:2], completions)   # untagged texts
    torch.testing.assert_close(scorer(prompts, completions), (want * expected).sum(1), atol=1e-5, rtol=1e-5)
    scores, parts = score_with_parts(scorer, prompts, completions)
    torch.testing.assert_close(parts["population"], want[:, 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, (want * expected).sum(1), atol=1e-5, rtol=1e-5)


def test_spec_weights_are_the_cold_start_and_profiles_are_checked(with_population, tok, tmp_path):
    scorer = load_scorer(f"{with_population}:helpful=0.5,harmless=0.5", user_tag="<user:{user}> ")
    w = weights_for(scorer, [tag_prompt("x", "zed"), tag_prompt("x", "alice")])
    torch.testing.assert_close(w["helpful"], torch.tensor([0.5, 0.9]))
    assert w["population"].tolist() == [0.0, 0.0]
    bad = {"heads": ["helpful", "kind"], "population": {"helpful": 1.0},
           "users": {"eve": {"weights": {"kind": 1.0}, "n": 3, "group": None}}}
    folder = build_heads_model(tmp_path / "bad", tok, profiles=bad)
    with pytest.raises(ConfigError, match="profiles are for the heads helpful, kind, not this model's .helpful, "
                                          "harmless."):
        load_scorer(folder, user_tag="<user:{user}> ")
    with pytest.raises(ConfigError, match="user_tag"):
        load_scorer(with_population, user_tag="<user>")


def test_tagged_prompts_reach_every_part_untagged(two_heads):
    heads_fixtures.SEEN_PROMPTS.clear()
    scorer = build_scorer([two_heads, "personal.heads_fixtures:recording_reward"], user_tag="[{user}] ")
    tagged = [tag_prompt(p, "bob", "[{user}] ") for p in PROMPTS]
    torch.testing.assert_close(scorer(tagged, COMPLETIONS), load_scorer(two_heads)(PROMPTS, COMPLETIONS))
    assert heads_fixtures.SEEN_PROMPTS == PROMPTS


def test_total_takes_row_weights():
    parts = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 20.0])}
    assert total(parts, {"a": torch.tensor([1.0, 0.0]), "b": 0.5}).tolist() == [6.0, 10.0]
    assert total(parts, {"a": 1.0, "b": 0.0}).tolist() == [1.0, 2.0]


def test_head_weights_for_user_rules():
    info = {"by": "group", "names": ["warm", "balanced"], "population": None}
    assert HeadWeights(info, None, None).population == {"warm": 0.5, "balanced": 0.5}   # no population head
    profiles = UserProfiles.from_dict(
        {"heads": ["warm", "balanced"], "population": {"warm": 0.4, "balanced": 0.6},
         "users": {"u1": {"weights": {"warm": 0.2, "balanced": 0.8}, "n": 5, "group": "warm"},
                   "u2": {"weights": {"warm": 0.5, "balanced": 0.5}, "n": 0, "group": "balanced"},
                   "u3": {"weights": {"warm": 0.3, "balanced": 0.7}, "n": 0, "group": None}}})
    hw = HeadWeights(info, None, profiles)
    assert hw.population == {"warm": 0.4, "balanced": 0.6}                               # the profiles' population
    assert hw.for_user("u1") == {"warm": 0.2, "balanced": 0.8}     # fitted to judgements: beats the group head
    assert hw.for_user("u2") == {"warm": 0.0, "balanced": 1.0}     # nothing fitted yet: the group head
    assert hw.for_user("u3") == {"warm": 0.3, "balanced": 0.7}     # nothing fitted, no group: the stored prior
    assert hw.for_user("warm") == {"warm": 1.0, "balanced": 0.0}
    assert hw.for_user("stranger") == hw.for_user(None) == hw.population
