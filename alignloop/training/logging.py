"""Metrics to JSONL and TensorBoard (W&B optional), and a progress bar with ETA. Only the main process writes."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class MetricsLogger:
    """`log(metrics, step)` appends `{"step": step, **metrics}` to `OUTPUT_DIR/metrics.jsonl` and writes scalars to
    TensorBoard under `OUTPUT_DIR/tensorboard`. `log_text(tag, text, step)` appends `{"step", "tag", "text"}` to
    `OUTPUT_DIR/events.jsonl` (warnings, stop reasons, sample tables: readable without TensorBoard) and to
    TensorBoard. On resume (`resume_step`), lines after that step are dropped from both files so they read as one
    uninterrupted run."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 wandb: bool = False, run_name: str | None = None, config: dict | None = None,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.events_path = self.path.with_name("events.jsonl")
        for path in (self.path, self.events_path):
            if resume_step is not None and path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                path.write_text("".join(line + "\n" for line in kept))
            elif resume_step is None and path.exists():
                path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional: tensorboard

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard missing or broken: metrics.jsonl still works
                self._tb = None
        if wandb:
            import wandb as _wandb  # noqa: PLC0415 - optional: the wandb extra

            self._wandb = _wandb.init(name=run_name, config=config, dir=str(output_dir))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "item") or isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for k, v in clean.items():
            if isinstance(v, float) and math.isfinite(v) and self._tb is not None:
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if not self.enabled:
            return
        with self.events_path.open("a") as f:
            f.write(json.dumps({"step": step, "tag": tag, "text": text}) + "\n")
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Progress:
    """A rich progress bar with ETA (main process only; silent when disabled)."""

    def __init__(self, total: int, description: str, enabled: bool = True, start: int = 0):
        self._p = None
        self.t0 = time.perf_counter()
        if not enabled:
            return
        self._p = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                               TextColumn("{task.fields[info]}"), transient=False)
        self._task = self._p.add_task(description, total=total, completed=start, info="")
        self._p.start()

    def update(self, advance: int = 1, info: str = "") -> None:
        if self._p is not None:
            self._p.update(self._task, advance=advance, info=info)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
