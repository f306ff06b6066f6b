"""Checkpoints and exact resume: model weights, optimizer, scheduler, RNG (per process) and the data position.

Layout of `OUTPUT_DIR/checkpoints/step-000123/`:
    model.safetensors        full state dict of each trained module (`<name>.safetensors` for extra ones)
    optimizer.pt, scheduler.pt
    rng-rank{r}.pt           python / numpy / torch / cuda RNG of process r
    trainer_state.json       step, epoch, position in the epoch, metrics history needed to continue, config
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
from safetensors.torch import load_model, save_model

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
    if accelerator.is_main_process:
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
