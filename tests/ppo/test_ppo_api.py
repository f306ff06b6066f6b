"""PPO's public surface: the config vocabulary shared with the other trainers (old names still work, with a
FutureWarning), callbacks with each update's `PPOExperience`, the `TrainResult`, weighted-reward parts."""
import dataclasses
import json
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from click.testing import CliRunner

from alignloop.errors import ConfigError
from alignloop.scoring import FunctionScorer, WeightedScorer
from alignloop.trainers.ppo import PPOConfig, PPOExperience, PPOTrainer
from alignloop.training import load_config
from alignloop.training.config import make_config_command
from alignloop.training.run import TrainResult

from .conftest import make_target_reward, small_lm

# old name -> (new name, a value to set through the old name)
RENAMED = {"model_name_or_path": ("model", "policy/dir"), "reward_model_name_or_path": ("reward_model", "rm/dir"),
           "gold_model_name_or_path": ("gold_model", "gold/dir"), "dataset": ("train_file", "prompts.jsonl"),
           "adam_eps": ("adam_epsilon", 1e-7), "progress_bar": ("progress", False), "save_every": ("save_steps", 3),
           "keep_last": ("save_total_limit", 5), "fused_gelu": ("fast_gelu", False)}


def _cfg(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "total_updates": 2, "rollout_batch_size": 8, "max_new_tokens": 6,
            "learning_rate": 1e-3, "progress": False, "save_final": False, "tensorboard": False, "sample_every": 0}
    base.update(kw)
    return PPOConfig(**base)


def _check_mapped(cfg):
    for new, value in RENAMED.values():
        assert getattr(cfg, new) == value, new


def test_old_names_still_work_as_python_keywords_yaml_keys_and_cli_flags(tmp_path):
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    assert not set(RENAMED) & names and {new for new, _ in RENAMED.values()} <= names
    old_values = {old: value for old, (_, value) in RENAMED.items()}
    # Python keywords
    with pytest.warns(FutureWarning) as caught:
        cfg = PPOConfig(**old_values)
    _check_mapped(cfg)
    for old, (new, _) in RENAMED.items():
        assert any(f"'{old}'" in str(w.message) and f"'{new}'" in str(w.message) for w in caught), old
    # YAML keys
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(old_values))
    with pytest.warns(FutureWarning, match="'dataset' .* is deprecated .* use 'train_file'"):
        _check_mapped(load_config(PPOConfig, path))
    # CLI flags (hidden from --help), through the same click command `alignloop ppo` is built with
    got = []
    command = make_config_command("ppo", PPOConfig, got.append, help="")
    flags = ["--model-name-or-path", "policy/dir", "--reward-model-name-or-path", "rm/dir",
             "--gold-model-name-or-path", "gold/dir", "--dataset", "prompts.jsonl", "--adam-eps", "1e-7",
             "--no-progress-bar", "--save-every", "3", "--keep-last", "5", "--no-fused-gelu"]
    with pytest.warns(FutureWarning, match="--model-name-or-path"):
        res = CliRunner().invoke(command, flags, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    _check_mapped(got[0])
    assert "--model-name-or-path" not in CliRunner().invoke(command, ["--help"]).output
    # a new name and its old one together is a mistake
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="not both"):
        PPOConfig(model="a", model_name_or_path="b")


def test_lora_vocabulary_and_deprecated_use_lora():
    assert PPOConfig().lora_r == 0 and PPOConfig(lora_r=4).lora_r == 4      # lora_r > 0 is LoRA
    with pytest.warns(FutureWarning, match="use_lora"):
        assert PPOConfig(use_lora=True).lora_r == 8                          # the old default rank
    with pytest.warns(FutureWarning, match="use_lora"):
        assert PPOConfig(use_lora=True, lora_r=4).lora_r == 4
    with pytest.warns(FutureWarning, match="use_lora"):
        assert PPOConfig(use_lora=False, lora_r=4).lora_r == 0               # old meaning: off whatever the rank
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = PPOConfig(lora_r=4, lora_alpha=8.0, lora_dropout=0.1, positive_label="POSITIVE", score_batch_size=16)
    assert (cfg.lora_alpha, cfg.lora_dropout, cfg.positive_label, cfg.score_batch_size) == (8.0, 0.1, "POSITIVE", 16)
    assert load_config(PPOConfig, positive_label=1).positive_label == 1     # an old YAML's integer label still loads


def test_callbacks_get_each_update_and_train_returns_a_train_result(tmp_path, tok, prompts):
    seen = []
    torch.manual_seed(0)
    tr = PPOTrainer(model=small_lm(tok), reward=make_target_reward(tok), args=_cfg(tmp_path), train_dataset=prompts,
                    tokenizer=tok, callbacks=[seen.append, lambda e: seen.append(e.step)])
    result = tr.train()
    assert isinstance(result, TrainResult)
    assert result.steps == 2 and len(result) == 2 and result.stop_reason is None
    assert result.metrics == result[-1] == result.history[-1] and list(result) == result.history
    assert result.output_dir == str(tmp_path)  # save_final=False: nothing under final/
    assert [type(x) for x in seen] == [PPOExperience, int, PPOExperience, int] and seen[1::2] == [1, 2]
    exp = seen[2]
    B, R = exp.rollout.response_ids.shape
    assert exp.step == 2 and B == 8 and len(exp.prompts) == len(exp.responses) == B
    assert exp.metrics is result.history[1]
    for name in ("old_logprobs", "ref_logprobs", "old_values", "entropy", "kl", "non_score_rewards", "rewards",
                 "advantages", "returns"):
        x = exp[name]
        assert x.shape == (B, R) and (x[~exp.response_mask] == 0).all(), name
    for name in ("scores", "raw_scores"):
        assert exp[name].shape == (B,)
    assert list(exp.reward_parts) == ["reward"] and torch.equal(exp.reward_parts["reward"], exp.raw_scores)
    assert exp.gold_scores is None and exp.kl_coef == 0.05
    # the rewards are the pure function's: Σ_t r_t = score − β·Σ_t KL_t
    assert torch.allclose(exp.rewards.sum(1), exp.scores - 0.05 * exp.kl.sum(1), atol=1e-6)
    with pytest.raises(KeyError):
        exp["last_batch"]


def test_weighted_reward_parts_are_logged(tmp_path, tok, prompts):
    share = make_target_reward(tok)

    def length(p, r):
        return [len(x) / 10 for x in r]

    reward = WeightedScorer([(FunctionScorer(share, "share"), 0.5), (FunctionScorer(length, "length"), 2.0)])
    seen = []
    torch.manual_seed(0)
    tr = PPOTrainer(model=small_lm(tok), reward=reward, args=_cfg(tmp_path, total_updates=1), train_dataset=prompts,
                    tokenizer=tok, callbacks=[seen.append])
    m = tr.train()[0]
    exp = seen[0]
    assert set(exp.reward_parts) == {"share", "length"}
    expected = 0.5 * exp.reward_parts["share"] + 2.0 * exp.reward_parts["length"]
    assert torch.allclose(exp.raw_scores, expected)
    assert m["reward/share"] == pytest.approx(exp.reward_parts["share"].mean().item())
    assert m["reward/length"] == pytest.approx(exp.reward_parts["length"].mean().item())
    assert m["reward/raw_mean"] == pytest.approx(0.5 * m["reward/share"] + 2.0 * m["reward/length"], abs=1e-5)


def test_reward_model_scored_in_score_batch_size_chunks(tmp_path, tok, prompts):
    from alignloop.models.tiny import tiny_sequence_classifier
    rm = tiny_sequence_classifier(tok, n_layer=1, n_embd=32, seed=7).eval()
    tr = PPOTrainer(model=small_lm(tok), reward=rm, args=_cfg(tmp_path, score_batch_size=3), train_dataset=prompts,
                    tokenizer=tok)
    assert tr.scorer.batch_size == 3


def test_critic_from_a_reward_model_object_is_wrapped_once(tmp_path, tok, prompts):
    """A RewardModel handed over as the reward starts the critic as it is (critic.model.<classifier>), not wrapped
    a second time (critic.model.model...), so checkpoints keep their parameter names."""
    from alignloop.models import RewardModel
    from alignloop.models.tiny import tiny_sequence_classifier

    rm = RewardModel(tiny_sequence_classifier(tok, n_layer=1, n_embd=32, seed=7)).eval()
    tr = PPOTrainer(model=small_lm(tok), reward=rm, args=_cfg(tmp_path, value_model="reward"),
                    train_dataset=prompts, tokenizer=tok)
    names = [n for n, _ in tr.model.critic.named_parameters()]
    assert names and all(not n.startswith("model.model.") for n in names), names[:3]
    with pytest.raises(ConfigError, match="one reward model"):
        PPOTrainer(model=small_lm(tok), reward=lambda p, c: [0.0] * len(c), args=_cfg(tmp_path, value_model="reward"),
                   train_dataset=prompts, tokenizer=tok)



_BF16_RUN = """
import json, sys, torch
from alignloop.models.tiny import default_corpus, tiny_causal_lm, train_tokenizer
from alignloop.trainers.ppo import PPOConfig, PPOTrainer
tok = train_tokenizer(vocab_size=300)
prompts = [" ".join(s.split()[: 1 + i % 6]) for i, s in enumerate(default_corpus(64, seed=1))]
seen = []
torch.manual_seed(0)
cfg = PPOConfig(output_dir=sys.argv[1], total_updates=1, rollout_batch_size=8, max_new_tokens=6, progress=False,
                save_final=False, tensorboard=False, sample_every=0, mixed_precision="bf16", lora_r=int(sys.argv[2]))
PPOTrainer(model=tiny_causal_lm(tok, n_layer=1, n_embd=32, seed=0), reward=lambda p, r: [len(x) / 10 for x in r],
           args=cfg, train_dataset=prompts, tokenizer=tok, callbacks=[seen.append]).train()
e = seen[0]
m = e.response_mask
print(json.dumps({"tokens": int(m.sum()), "max_abs_kl": e.kl[m].abs().max().item(),
                  "max_abs_ref_minus_old": (e.ref_logprobs - e.old_logprobs)[m].abs().max().item()}))
"""


@pytest.mark.parametrize("lora_r", [0, 4])
def test_reference_runs_in_the_policys_precision(tmp_path, lora_r):
    """Under bf16 autocast the policy's forward runs in bf16 (accelerate wraps the prepared model's forward); the
    reference must too, or the KL to the reference is not 0 at the first update, when the policy still equals it
    (a float32 reference gave up to 9.6e-4 per token here). Both a frozen copy and LoRA's adapter-off view. (A
    process of its own: accelerate's precision is per process.)"""
    r = subprocess.run([sys.executable, "-c", _BF16_RUN, str(tmp_path), str(lora_r)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["tokens"] > 8
    assert got["max_abs_kl"] == 0.0 and got["max_abs_ref_minus_old"] == 0.0, got
