import json

import yaml
from click.testing import CliRunner

from alignloop.cli import cli
from alignloop.models.tiny import build_tiny_checkpoint, train_tokenizer


def test_ppo_cli_runs_from_yaml(tmp_path):
    tok = train_tokenizer(vocab_size=300)
    policy = build_tiny_checkpoint(tmp_path / "policy", tokenizer=tok, n_layer=1, n_embd=32)
    reward = build_tiny_checkpoint(tmp_path / "reward", tokenizer=tok, kind="classifier", n_layer=1, n_embd=32)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie", "a plot", "good", "it was"] * 4))
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(policy), "reward_model": str(reward),
                                   "train_file": str(data), "output_dir": str(tmp_path / "out"), "total_updates": 3,
                                   "rollout_batch_size": 4, "max_new_tokens": 6, "progress": False}))
    res = CliRunner().invoke(cli, ["ppo", "--config", str(cfg), "--total-updates", "2", "--kl-coef", "0.1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.rindex('{"updates"'):].splitlines()[0])  # after progress bars
    assert out["updates"] == 2
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["objective/kl_coef"] == 0.1
    assert (tmp_path / "out" / "final" / "value_head.safetensors").exists()


def test_ppo_cli_user_errors(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "alignloop.cli", "ppo", "--total-updates", "2"], capture_output=True,
                       text=True)
    assert p.returncode == 2 and "error: alignloop ppo needs --model" in p.stderr
    assert "Traceback" not in p.stderr
    res = CliRunner().invoke(cli, ["ppo", "--kl-estimator", "k9"])
    assert res.exit_code == 2
    assert "--kl-coef" in CliRunner().invoke(cli, ["ppo", "--help"]).output
