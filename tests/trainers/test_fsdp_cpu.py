"""SFT and reward-model trainers under accelerate's FSDP2 on CPU: 2 gloo processes launched with the shipped
`examples/accelerate/fsdp2.yaml` (`accelerate launch --config_file ...`; alignloop.training.loop.fsdp_on_cpu puts
accelerate's FSDP2 path in place where accelerate alone would fall back to DDP). Checked: the parameters are sharded
(DTensors, each process holding half of each one), the run equals a 1-process run with the same global batch,
final/ is the full state dict and plain transformers loads it, and a run resumed from a sharded checkpoint ends
with the same weights as an uninterrupted one."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignloop.errors import ConfigError
from alignloop.training import load_checkpoint, read_metrics

ROOT = Path(__file__).resolve().parents[2]
FSDP_CONFIG = ROOT / "examples" / "accelerate" / "fsdp2.yaml"

SCRIPT = r'''
import json, sys, torch
torch.set_num_threads(1)
from accelerate import Accelerator
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

kind, model, out, data, batch, extra = sys.argv[1:7]
prepared = {}
prepare = Accelerator.prepare


def spy(self, *args, **kwargs):  # what the trainer's accelerator.prepare made of the model
    result = prepare(self, *args, **kwargs)
    prepared["model"], prepared["acc"] = result[0], self
    return result


Accelerator.prepare = spy
if kind == "sft":
    from alignloop.trainers.sft import SFTConfig as C, SFTTrainer as T
else:
    from alignloop.trainers.rm import RewardConfig as C, RewardTrainer as T
T(model=model, args=C(output_dir=out, per_device_batch_size=int(batch), max_length=64, seed=3, progress=False,
                      tensorboard=False, logging_steps=1, **json.loads(extra)), train_dataset=data).train()
m, acc = prepared["model"], prepared["acc"]
params = dict(m.named_parameters())
report = {"distributed_type": acc.distributed_type.value, "processes": acc.num_processes, "params": len(params),
          "dtensors": sum(isinstance(p, DTensor) for p in params.values()),
          "fsdp_modules": sum(isinstance(x, FSDPModule) for x in m.modules()),
          "shards": {n: [p.to_local().numel(), p.numel()] for n, p in params.items() if isinstance(p, DTensor)}}
with open(f"{out}/shards-rank{acc.process_index}.json", "w") as f:
    json.dump(report, f)
if acc.num_processes > 1:  # the weights the sharded model holds at the end, gathered (a collective)
    full = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if acc.is_main_process:
        torch.save(full, f"{out}/gathered.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # exiting with gloo's threads alive can abort a rank
'''


def launch(tmp_path, n, kind, model, out, data, batch, **extra):
    """n == 1: a plain process; n == 2: `accelerate launch --config_file examples/accelerate/fsdp2.yaml`."""
    script = tmp_path / "fsdp_run.py"
    script.write_text(SCRIPT)
    args = [str(script), kind, model, str(out), data, str(batch), json.dumps(extra)]
    if n == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", str(n), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line or "what()" in line]
    assert proc.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + proc.stderr[-3000:]
    return proc


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def trainer_of(kind, sft_file, pref_files):
    return (sft_file, AutoModelForCausalLM) if kind == "sft" else (pref_files[0], AutoModelForSequenceClassification)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_fsdp_two_processes_equal_one(tmp_path, base_model, sft_file, pref_files, kind):
    data, auto = trainer_of(kind, sft_file, pref_files)
    common = dict(learning_rate=1e-3, max_steps=3)
    launch(tmp_path, 1, kind, base_model, tmp_path / "one", data, 8, **common)
    # 2 processes x 2 examples x 2 accumulation steps (the first micro-batch without gradient sync) = 8
    proc = launch(tmp_path, 2, kind, base_model, tmp_path / "fsdp", data, 2, gradient_accumulation_steps=2, **common)
    assert "using its FSDP2 path over gloo" in proc.stderr

    # sharded while training: every parameter a DTensor, each process holding half of each one (dim 0 split in
    # two: equal halves for an even first dimension), transformer blocks wrapped as their own FSDP units
    reports = [json.loads((tmp_path / "fsdp" / f"shards-rank{r}.json").read_text()) for r in range(2)]
    one = json.loads((tmp_path / "one" / "shards-rank0.json").read_text())
    assert one["dtensors"] == 0 and one["distributed_type"] == "NO"
    for rep in reports:
        assert rep["distributed_type"] == "FSDP" and rep["processes"] == 2
        assert rep["dtensors"] == rep["params"] == one["params"]
        assert rep["fsdp_modules"] >= 3  # the root and the 2 GPT2Blocks (the reward model wraps the same blocks)
    for name, (local, total) in reports[0]["shards"].items():
        assert local + reports[1]["shards"][name][0] == total, name
        assert abs(local - total / 2) <= total / 2 * 0.1 or total < 64, (name, local, total)
    big = max(reports[0]["shards"].values(), key=lambda lt: lt[1])
    assert big[0] == big[1] // 2  # the embedding: exactly half here

    # final/: the full state dict, every key of the unsharded run's, loaded by plain transformers and equal to
    # the weights the sharded model held at the end (gathered)
    one_w, fsdp_w = weights(tmp_path / "one" / "final"), weights(tmp_path / "fsdp" / "final")
    assert fsdp_w.keys() == one_w.keys()
    loaded = auto.from_pretrained(tmp_path / "fsdp" / "final").state_dict()
    gathered = torch.load(tmp_path / "fsdp" / "gathered.pt")
    prefix = "" if kind == "sft" else "model."  # the reward model wraps the transformers classifier
    for k, v in loaded.items():
        assert torch.equal(v, gathered[prefix + k]), k
    # the same global batch as 1 process x 8 (the same examples): 3 AdamW steps at lr 1e-3 move a weight <= 3e-3;
    # FSDP's reduce-scatter and the accumulation sum the gradient in another order (~1e-7 relative, < 5e-7 in the
    # weights here) -> atol 1.5e-4 = 5% of lr x steps, as for DDP (test_sft_rm.py::test_two_processes_equal_one)
    worst = max((one_w[k] - fsdp_w[k]).abs().max().item() for k in one_w)
    assert worst <= 1.5e-4, worst
    moved = max((one_w[k] - weights(base_model)[k]).abs().max().item() for k in one_w if k in weights(base_model))
    assert moved > 10 * worst  # the runs trained (a tolerance the weights' movement would pass means nothing)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_fsdp_resume_from_sharded_checkpoint(tmp_path, dropout_model, sft_file, pref_files, kind):
    """Dropout on, cosine schedule with warmup: a resume that lost the RNG, the data position, the (sharded)
    optimizer moments or the schedule would end elsewhere."""
    data, _ = trainer_of(kind, sft_file, pref_files)
    common = dict(learning_rate=1e-3, max_steps=6, save_steps=3, save_total_limit=None, lr_scheduler="cosine",
                  warmup_steps=2)
    if kind == "rm":
        common["disable_dropout"] = False
    launch(tmp_path, 2, kind, dropout_model, tmp_path / "full", data, 4, **common)
    ckpt = tmp_path / "full" / "checkpoints" / "step-000003"
    # a sharded checkpoint: each process's shards (DCP), no gathered weights
    assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.pt").exists()
    # "interrupted" after step 3: only that checkpoint survives; resume into a fresh folder
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoints" / "step-000003")
    launch(tmp_path, 2, kind, dropout_model, tmp_path / "resumed", data, 4, resume_from="latest", **common)
    full, resumed = weights(tmp_path / "full" / "final"), weights(tmp_path / "resumed" / "final")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    steps = [m["step"] for m in read_metrics(tmp_path / "resumed") if "loss/" + kind in m]
    assert steps == [4, 5, 6]  # it resumed (steps 1-3 not run again) and ran to the end
    # a sharded checkpoint is refused without FSDP, by name
    with pytest.raises(ConfigError, match="sharded"):
        load_checkpoint(ckpt, accelerator=SimpleNamespace(is_fsdp2=False), modules={})


def head_rows(src, n, dest):
    lines = Path(src).read_text().splitlines()[:n]
    dest.write_text("\n".join(lines) + "\n")
    return str(dest)


def test_even_micro_batches_same_count_everywhere():
    """Every process gets as many micro-batches (FSDP's forwards and backwards are collectives); the real ones are
    exactly its shard (weight 1), the padding a real row of weight 0."""
    from alignloop.training.fsdp import even_micro_batches
    from alignloop.training.loop import micro_batches, shard

    for n in range(14):
        for world in (1, 2, 3, 4):
            for size in (1, 2, 3):
                idx = list(range(100, 100 + n))
                parts = [even_micro_batches(idx, r, world, size) for r in range(world)]
                assert len({len(p) for p in parts}) == 1, (n, world, size)
                for r, p in enumerate(parts):
                    real = [mb for mb, w in p if w == 1.0]
                    assert real == [mb for mb in micro_batches(shard(idx, r, world), size) if mb]
                    assert all(mb == [idx[0]] for mb, w in p if w == 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_fsdp_uneven_train_and_eval_sets(tmp_path, base_model, sft_file, pref_files, kind):
    """Sizes that do not split evenly: 13 training rows in global batches of 8 (2 processes x 2 x 2 accumulation)
    leave a last batch of 5 per epoch (3 rows = 2 micro-batches on process 0, 2 rows = 1 on process 1), and 5 eval
    rows in micro-batches of 2 give process 0 two forwards and process 1 one. Under FSDP every forward is a
    collective: each process must run as many (the short one pads with a zero-weight dummy micro-batch), else the
    run hangs. It finishes, and equals the 1-process run (weights and eval loss)."""
    data, _ = trainer_of(kind, sft_file, pref_files)
    train = head_rows(data, 13, tmp_path / "train13.jsonl")
    held = head_rows(data if kind == "sft" else pref_files[1], 5, tmp_path / "eval5.jsonl")
    common = dict(learning_rate=1e-3, num_epochs=2, eval_file=held)
    launch(tmp_path, 1, kind, base_model, tmp_path / "one", train, 8, **common)
    launch(tmp_path, 2, kind, base_model, tmp_path / "fsdp", train, 2, gradient_accumulation_steps=2, **common)
    one_w, fsdp_w = weights(tmp_path / "one" / "final"), weights(tmp_path / "fsdp" / "final")
    assert fsdp_w.keys() == one_w.keys()
    worst = max((one_w[k] - fsdp_w[k]).abs().max().item() for k in one_w)
    assert worst <= 2e-4, worst  # 4 steps at lr 1e-3 (5% of lr x steps, as above)
    moved = max((one_w[k] - weights(base_model)[k]).abs().max().item() for k in one_w if k in weights(base_model))
    assert moved > 10 * worst

    def evals(out):
        return [(m["step"], m["eval/loss"]) for m in read_metrics(out) if "eval/loss" in m]

    one_e, fsdp_e = evals(tmp_path / "one"), evals(tmp_path / "fsdp")
    assert [s for s, _ in one_e] == [s for s, _ in fsdp_e] and one_e
    for (_, x), (_, y) in zip(one_e, fsdp_e, strict=True):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (one_e, fsdp_e)
    steps = [m["step"] for m in read_metrics(tmp_path / "fsdp") if "loss/" + kind in m]
    assert steps == [1, 2, 3, 4]  # 2 epochs of 2 steps, the short last batches included


def test_fsdp_on_cpu_only_when_asked_and_only_fsdp2(monkeypatch):
    """The fallback is taken only where FSDP was asked for and accelerate chose DDP on CPU; FSDP1 is refused."""
    from accelerate.utils import DistributedType

    from alignloop.training.loop import fsdp_on_cpu

    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_main_process=True, num_processes=2)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_on_cpu(acc) is False  # not asked: DDP stays DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for other in (DistributedType.NO, DistributedType.FSDP, DistributedType.MULTI_GPU):
        assert fsdp_on_cpu(SimpleNamespace(distributed_type=other)) is False  # accelerate's own choice stands
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP2"):
        fsdp_on_cpu(acc)


def test_online_rl_trainers_refuse_fsdp():
    """PPO, GRPO/RLOO and online DPO share `rl.prepared_optimization`: under FSDP (an accelerator that shards) it
    refuses with a clear ConfigError before preparing anything, instead of training a sharded policy its rollout,
    reference and value passes were not written for."""
    from alignloop.rl import prepared_optimization

    acc = SimpleNamespace(is_fsdp2=True, prepare=lambda *a: pytest.fail("prepared under FSDP"))
    args = SimpleNamespace(learning_rate=1e-3, weight_decay=0.0, adam_epsilon=1e-8, lr_scheduler="constant",
                           warmup_updates=0, total_updates=1)
    with pytest.raises(ConfigError, match="do not run under FSDP yet"):
        prepared_optimization(torch.nn.Linear(2, 2), args, acc)


def test_fsdp1_refused_on_any_device(monkeypatch):
    """accelerate turns FSDP on by itself on GPUs, with the plugin's fsdp_version (1 unless the config says 2):
    make_accelerator refuses FSDP1 whatever the device, since every sharded path here is FSDP2's."""
    from accelerate.utils import DistributedType

    import alignloop.training.loop as loop

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)  # not the CPU fallback: accelerate's own FSDP (a GPU)
    for version, refused in ((1, True), (2, False)):
        stub = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=version == 2)
        monkeypatch.setattr(loop, "Accelerator", lambda stub=stub, **kw: stub)
        if refused:
            with pytest.raises(ConfigError, match="FSDP1 is not supported.*fsdp_version: 2"):
                loop.make_accelerator()
        else:
            assert loop.make_accelerator() is stub
    for other in (DistributedType.NO, DistributedType.MULTI_GPU):  # no FSDP: nothing to refuse
        stub = SimpleNamespace(distributed_type=other)
        monkeypatch.setattr(loop, "Accelerator", lambda stub=stub, **kw: stub)
        assert loop.make_accelerator() is stub


def test_pipeline_refuses_fsdp_up_front(monkeypatch, tmp_path):
    """A pipeline launched under FSDP whose config has stages that refuse FSDP (PPO, RLOO, GRPO, online DPO,
    RL-CAI) stops before its first stage, naming them, instead of after training SFT and the reward model."""
    from alignloop.pipeline.config import AIFeedbackSettings, PipelineConfig
    from alignloop.pipeline.runner import Pipeline, refuse_under_fsdp

    cfg = PipelineConfig(output_dir=str(tmp_path / "run"), prompts=[f"p{i}" for i in range(8)], grpo={})
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    refuse_under_fsdp(cfg)  # not under FSDP: nothing refused
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    pipe = Pipeline(cfg, echo=lambda *_: None)
    pipe._sft = lambda: pytest.fail("a stage ran")
    with pytest.raises(ConfigError, match=r"do not run under FSDP yet: ppo, grpo"):
        pipe.run_all()
    cfg.ppo, cfg.grpo = None, None
    cfg.ai_feedback = AIFeedbackSettings(rl="rloo")
    with pytest.raises(ConfigError, match=r"ai_feedback.rl \(rloo\)"):
        refuse_under_fsdp(cfg)
    cfg.ai_feedback = None
    refuse_under_fsdp(cfg)  # SFT, RM, DPO, KTO only: allowed
