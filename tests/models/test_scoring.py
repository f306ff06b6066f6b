"""alignloop.scoring, the one home of "text -> reward": how each kind of model sees the text, functions, weighted
sums, specs, and the checks on what is refused."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from alignloop.data import reward_input_ids
from alignloop.errors import UserError
from alignloop.models import RewardModel
from alignloop.rollout import Rollout, left_pad
from alignloop.scoring import (
    FunctionScorer,
    ModelScorer,
    WeightedScorer,
    build_scorer,
    is_function_spec,
    load_scorer,
    spec_name,
    split_weight,
)

SHAPE = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}

WORDS = "the movie was good bad plot actor great boring fun a film and story music it".split()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT classifier with a WordPiece tokenizer built from a local vocabulary: [CLS] ... [SEP]."""
    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, num_labels=2,
                     id2label={0: "hate", 1: "nothate"}, label2id={"hate": 0, "nothate": 1})
    return BertForSequenceClassification(cfg).eval(), tok


def _own_score(model, tok, text: str, label: int) -> float:
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        return float(model(**enc).logits[0, label])


def test_encoder_classifier_sees_its_special_tokens(bert):
    """An encoder classifier scores prompt + completion exactly as it scores that text itself: with [CLS]/[SEP]."""
    model, tok = bert
    scorer = ModelScorer(model, tok, positive_label="nothate")
    assert not scorer.decoder and scorer.label == 1
    prompts, completions = ["the movie", "a plot"], [" was good", " was boring and bad"]
    got = scorer(prompts, completions).tolist()
    want = [_own_score(model, tok, p + c, 1) for p, c in zip(prompts, completions, strict=True)]
    assert got == pytest.approx(want, abs=1e-5)
    # without the special tokens the classifier pools another token and scores differently
    ids = tok(prompts[0] + completions[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        bare = float(model(input_ids=torch.tensor([ids])).logits[0, 1])
    assert abs(bare - want[0]) > 1e-4


def test_encoder_classifier_keeps_the_end_of_a_long_text(bert):
    """A prompt longer than the classifier's context (16 positions): the completion (the end) is what is kept."""
    model, tok = bert
    prompt, completion = " ".join(["the movie was boring"] * 10), " it was fun"
    got = float(ModelScorer(model, tok, positive_label=1)([prompt], [completion])[0])
    ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    kept = [tok.cls_token_id] + ids[-14:] + [tok.sep_token_id]
    with torch.no_grad():
        want = float(model(input_ids=torch.tensor([kept])).logits[0, 1])
    assert got == pytest.approx(want, abs=1e-5)


def test_decoder_reward_model_scores_like_its_training(tok, reward_dir):
    rm = RewardModel.from_pretrained(reward_dir).eval()
    scorer = ModelScorer(rm, tok)
    prompts, completions = ["the movie", "plot"], [" was fun", " bad" + tok.eos_token]
    got = scorer(prompts, completions).tolist()
    with torch.no_grad():
        want = [float(rm(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0])
                for s in reward_input_ids(tok, prompts, completions)]
    assert got == pytest.approx(want, abs=1e-5)
    # eos per row: no EOS after a completion cut at max_new_tokens
    no_eos = scorer(prompts, completions, eos=[False, True]).tolist()
    with torch.no_grad():
        s = reward_input_ids(tok, prompts[:1], completions[:1], add_eos=False)[0]
        want0 = float(rm(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0])
    assert no_eos == pytest.approx([want0, want[1]], abs=1e-5)


def test_rollout_tokens_and_retokenised_text_agree(tok, reward_dir):
    """Same vocabulary: the rollout's own tokens are scored; re-tokenising the texts (EOS where the policy stopped)
    gives the same scores when the tokens are the text's own tokenisation (a sampled token sequence need not be)."""
    rm = RewardModel.from_pretrained(reward_dir).eval()
    prompts, texts, stopped = ["the movie", "a good film", "plot"], [" was fun", " and music", " bad"], [1, 0, 1]
    responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * s
                 for t, s in zip(texts, stopped, strict=True)]
    prompt_ids, prompt_mask = left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], 0)
    width = max(len(x) for x in responses)
    response_ids = torch.tensor([x + [0] * (width - len(x)) for x in responses])
    response_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in responses]).bool()
    r = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(3, width), torch.zeros(3, width),
                torch.tensor(stopped).bool())
    fast = ModelScorer(rm, tok, policy_tokenizer=tok)
    assert not fast.retokenize
    slow = ModelScorer(rm, tok, policy_tokenizer=tok)
    slow.retokenize = True
    torch.testing.assert_close(fast.score_rollout(r, prompts, texts), slow.score_rollout(r, prompts, texts),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow.score_rollout(r, prompts, texts), slow(prompts, texts, eos=[1, 0, 1]))


def test_weighted_sum_of_a_function_and_a_model(tok, reward_dir):
    def length(prompts, completions):
        return [float(len(c)) for c in completions]

    rm = ModelScorer(RewardModel.from_pretrained(reward_dir).eval(), tok, name="rm")
    scorer = WeightedScorer([(FunctionScorer(length), 0.5), (rm, -2.0)])
    prompts, completions = ["the movie", "plot"], [" was fun", " bad and boring"]
    parts = scorer.parts(prompts, completions)
    assert list(parts) == ["length", "rm"] and scorer.weights == {"length": 0.5, "rm": -2.0}
    assert parts["length"].tolist() == [8.0, 15.0]
    torch.testing.assert_close(parts["rm"], rm(prompts, completions))
    torch.testing.assert_close(scorer(prompts, completions), 0.5 * parts["length"] - 2.0 * parts["rm"])
    # the same function twice keeps both parts apart
    twice = WeightedScorer([(FunctionScorer(length), 1.0), (FunctionScorer(length), 1.0)])
    assert list(twice.weights) == ["length", "length_2"]
    assert twice(prompts, completions).tolist() == [16.0, 30.0]


def test_specs_load_models_functions_and_weighted_sums(tok, reward_dir, lm_dir):
    assert is_function_spec("alignloop.demo.domain:gold_scores") and not is_function_spec(str(reward_dir))
    assert split_weight("runs/rm/final=0.7") == ("runs/rm/final", 0.7) and split_weight("a=b") == ("a=b", 1.0)
    assert spec_name("runs/rm/final") == "rm" and spec_name("pkg.mod:fn") == "fn"
    scorer = load_scorer(str(reward_dir))
    assert isinstance(scorer, ModelScorer) and scorer.decoder
    both = load_scorer([f"{reward_dir}=0.25", "alignloop.demo.domain:gold_scores=2"])
    assert isinstance(both, WeightedScorer) and both.weights == {reward_dir.name: 0.25, "gold_scores": 2.0}
    prompts, completions = ["p", "q"], ["fun . fun .", "dull . dull ."]
    parts = both.parts(prompts, completions)
    assert parts["gold_scores"].tolist() == [2.0, -2.0]
    torch.testing.assert_close(both(prompts, completions), 0.25 * parts[reward_dir.name] + 2 * parts["gold_scores"])
    assert isinstance(build_scorer(lambda p, c: [0.0] * len(c)), FunctionScorer) and build_scorer(None) is None
    with pytest.raises(UserError, match="not a reward model"):
        load_scorer(str(lm_dir))       # a causal LM has no trained head: its scores would be random
    with pytest.raises(UserError, match="no_such_module_xyz"):
        load_scorer("no_such_module_xyz:f")
    with pytest.raises(UserError, match="returned 1 scores for 2"):
        FunctionScorer(lambda p, c: [0.0])(["a", "b"], ["x", "y"])


def test_roberta_style_classifier_takes_its_real_context(bert):
    """RoBERTa reserves padding_idx + 1 positions: 20 positions hold 18 tokens. A long text is cut to fit instead of
    running off the position table (roberta-base: 514 positions, 512 tokens)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from alignloop.models import context_length

    _, tok = bert
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=20, num_labels=2, pad_token_id=1)).eval()
    assert context_length(model) == 18 and context_length(model, tok) == 18
    scores = ModelScorer(model, tok, positive_label=1)([" ".join(["the movie was boring"] * 10)], [" it was fun"])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


def test_decoder_classifier_with_several_labels_sees_its_own_view(tok, classifier_dir):
    """A GPT-2 classifier with several labels was not trained on reward-model sequences (no EOS appended): it scores
    the text as it scores it itself."""
    from alignloop.models import ClassifierReward

    cr = ClassifierReward.from_pretrained(classifier_dir, positive_label=1)
    scorer = load_scorer(str(classifier_dir))
    assert scorer.decoder and not scorer.reward_model_view and scorer.retokenize
    prompts, completions = ["the movie", "a plot"], [" was fun", " was bad"]
    torch.testing.assert_close(scorer(prompts, completions), cr([p + c for p, c in zip(prompts, completions,
                                                                                        strict=True)]))


def test_one_weighted_spec_and_long_rollouts(tok, reward_dir):
    half = load_scorer(f"{reward_dir}=0.5")
    whole = load_scorer(str(reward_dir))
    assert isinstance(half, WeightedScorer) and half.weights == {"rm": 0.5}
    torch.testing.assert_close(half(["p"], [" q"]), 0.5 * whole(["p"], [" q"]))
    # a rollout longer than the reward model's context (64) is scored through the text path, fitted like rm does
    rm = ModelScorer(RewardModel.from_pretrained(reward_dir).eval(), tok, policy_tokenizer=tok)
    prompt = " ".join(["the movie was good"] * 30)
    p_ids, p_mask = left_pad([tok(prompt, add_special_tokens=False)["input_ids"]], 0)
    r_ids = torch.tensor([tok(" fun", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    r = Rollout(p_ids, p_mask, r_ids, torch.ones_like(r_ids).bool(), torch.zeros(r_ids.shape),
                torch.zeros(r_ids.shape), torch.tensor([True]))
    torch.testing.assert_close(rm.score_rollout(r, [prompt], [" fun"]), rm([prompt], [" fun"]))
