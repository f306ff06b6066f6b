"""Checkpoints and exact resume: model weights, optimizer, scheduler, RNG (per process) and the data position.

Layout of `OUTPUT_DIR/checkpoints/step-000123/`:
    model.safetensors        full state dict of each trained module (`<name>.safetensors` for extra ones)
    optimizer.pt, scheduler.pt
    rng-rank{r}.pt           python / numpy / torch / cuda RNG of process r
    trainer_state.json       step, epoch, position in the epoch, metrics history needed to continue, config
Under FSDP (parameters and optimizer moments sharded over the processes), the weights and the optimizer are one
torch.distributed.checkpoint (DCP) folder instead of model.safetensors / optimizer.pt:
    sharded/                 {"model": {<module name>: its state dict}, "optimizer": ...}: every process writes
                             its own shards (`__<rank>_0.distcp`) and reads back what it holds, whatever the number
                             of processes that resumes it; on several machines output_dir must be a shared folder
A checkpoint is written to a temporary folder and renamed into place, so an interrupted save never leaves a
half-written checkpoint that resume would pick up.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from alignloop.errors import ConfigError

_STEP_RE = re.compile(r"^step-(\d+)$")


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def save_checkpoint(output_dir: str | Path, step: int, *, accelerator, modules: dict[str, torch.nn.Module],
                    optimizer=None, scheduler=None, trainer_state: dict[str, Any],
                    keep_last: int | None = None) -> Path:
    """Save everything needed for exact resume. Every process writes its RNG; the main process writes the rest."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(capture_rng(), tmp / f"rng-rank{accelerator.process_index}.pt")
    if is_sharded(accelerator):
        dcp.save(_sharded_state(modules, optimizer), checkpoint_id=tmp / "sharded")  # every process: its shards
    if accelerator.is_main_process:
        if not is_sharded(accelerator):
            for name, module in modules.items():
                save_model(accelerator.unwrap_model(module), str(tmp / f"{name}.safetensors"))
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1, default=str))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep_last:
            root = final.parent
            olds = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)))
            for _, p in olds[:-keep_last]:
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: str | Path, *, accelerator, modules: dict[str, torch.nn.Module], optimizer=None,
                    scheduler=None) -> dict[str, Any]:
    """Restore a checkpoint written by `save_checkpoint` and return its trainer_state."""
    path = Path(path)
    if is_sharded(accelerator):
        if not (path / "sharded").is_dir():
            raise ConfigError(f"resume_from: {path} is not a sharded (FSDP) checkpoint; resume it without FSDP")
        state = _sharded_state(modules, optimizer)
        dcp.load(state, checkpoint_id=path / "sharded")  # in place: each process reads the shards it holds
        for name, module in modules.items():
            set_model_state_dict(module, state["model"][name])
        if optimizer is not None:
            set_optimizer_state_dict(_optimizer_owner(modules), optimizer, state["optimizer"])
    else:
        if (path / "sharded").is_dir():
            raise ConfigError(f"resume_from: {path} is a sharded (FSDP) checkpoint; resume it under FSDP")
        for name, module in modules.items():
            load_model(accelerator.unwrap_model(module), str(path / f"{name}.safetensors"),
                       device=str(accelerator.device))
        if optimizer is not None:
            state = torch.load(path / "optimizer.pt", map_location=accelerator.device, weights_only=False)
            optimizer.load_state_dict(state)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-rank{accelerator.process_index}.pt"
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def is_sharded(accelerator) -> bool:
    """Whether the accelerator shards parameters (FSDP2): checkpoints and the final save then gather or write shards
    on every process."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def _optimizer_owner(modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
    # the optimizer trains the first module's parameters (the trainers' {"model": model, ...})
    return next(iter(modules.values()))


def _sharded_state(modules: dict[str, torch.nn.Module], optimizer) -> dict[str, Any]:
    """The sharded (DTensor) state dicts DCP saves, or loads into in place."""
    state: dict[str, Any] = {"model": {name: get_model_state_dict(m) for name, m in modules.items()}}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(_optimizer_owner(modules), optimizer)
    return state


def resolve_resume(resume_from: str | None, output_dir: str | Path) -> Path | None:
    """`resume_from`: None (fresh run), "latest" (the newest checkpoint in output_dir, if any) or a folder."""
    if not resume_from:
        return None
    if resume_from == "latest":
        return latest_checkpoint(output_dir)
    p = Path(resume_from)
    if not (p / "trainer_state.json").is_file():
        raise ConfigError(f"resume_from: {p} is not a checkpoint folder (no trainer_state.json)")
    return p
