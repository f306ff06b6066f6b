"""Reward-hacking guard for PPO: watch the proxy reward together with KL and (when given) a held-out/gold scorer.

    guard = RewardHackingGuard(kl_budget=10.0, window=5, action="warn")
    alerts = guard.update(step, proxy=reward_mean, kl=kl_mean, gold=gold_mean_or_None)
    if guard.should_stop: ...

Two alarms (Gao et al. 2022: the proxy keeps rising while the true reward peaks and falls):
- **divergence**: over the last `window` updates the proxy reward's least-squares slope is > 0 while the held-out
  score's slope is < 0 (needs a gold scorer);
- **KL budget**: the mean per-sequence KL to the reference exceeds `kl_budget` nats.
Each alarm is returned as a message (the trainer logs it as a warning); with action="stop" training stops.

`SampleTable` writes every N updates a table of prompts, responses and rewards to `samples.jsonl` (one JSON object
per row, with the update step) so that a person can read what the policy is doing.
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path

from alignloop.errors import ConfigError


def _slope(ys: list[float]) -> float:
    n = len(ys)
    if n < 2:
        return 0.0
    xm = (n - 1) / 2
    ym = sum(ys) / n
    num = sum((i - xm) * (y - ym) for i, y in enumerate(ys))
    den = sum((i - xm) ** 2 for i in range(n))
    return num / den


class RewardHackingGuard:
    def __init__(self, kl_budget: float | None = None, window: int = 5, action: str = "warn"):
        if action not in ("warn", "stop"):
            raise ConfigError(f"guard_action must be warn or stop, got {action!r}")
        if window < 2:
            raise ConfigError(f"guard_window must be >= 2, got {window}")
        self.kl_budget, self.window, self.action = kl_budget, window, action
        self.proxy: deque[float] = deque(maxlen=window)
        self.gold: deque[float] = deque(maxlen=window)
        self.should_stop = False
        self.alerts: list[tuple[int, str]] = []

    def update(self, step: int, proxy: float, kl: float, gold: float | None = None) -> list[str]:
        msgs = []
        self.proxy.append(float(proxy))
        if gold is not None:
            self.gold.append(float(gold))
        if self.kl_budget is not None and kl > self.kl_budget:
            msgs.append(f"update {step}: KL to the reference {kl:.3f} passed its budget {self.kl_budget:.3f}")
        if len(self.gold) == self.window and len(self.proxy) == self.window:
            sp, sg = _slope(list(self.proxy)), _slope(list(self.gold))
            if sp > 0 and sg < 0:
                msgs.append(f"update {step}: possible reward hacking: proxy reward rising (slope {sp:+.4f}/update) "
                            f"while the held-out score falls (slope {sg:+.4f}/update) over {self.window} updates")
        for m in msgs:
            self.alerts.append((step, m))
        if msgs and self.action == "stop":
            self.should_stop = True
        return msgs

    def state_dict(self) -> dict:
        return {"proxy": list(self.proxy), "gold": list(self.gold), "alerts": list(self.alerts)}

    def load_state_dict(self, state: dict) -> None:
        self.proxy = deque(state["proxy"], maxlen=self.window)
        self.gold = deque(state["gold"], maxlen=self.window)
        self.alerts = [tuple(a) for a in state["alerts"]]


class SampleTable:
    """Appends rows {step, prompt, response, score, raw_score, gold?} to OUTPUT_DIR/samples.jsonl; returns a
    markdown table (for TensorBoard text) of the same rows."""

    def __init__(self, output_dir: str | Path, max_rows: int = 8):
        self.path = Path(output_dir) / "samples.jsonl"
        self.max_rows = max_rows

    def write(self, step: int, prompts, responses, scores, raw_scores, gold=None) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        n = min(self.max_rows, len(prompts))
        lines = ["| prompt | response | score | raw score |" + (" gold |" if gold is not None else ""),
                 "|---|---|---|---|" + ("---|" if gold is not None else "")]
        with self.path.open("a") as f:
            for i in range(n):
                row = {"step": step, "prompt": prompts[i], "response": responses[i], "score": float(scores[i]),
                       "raw_score": float(raw_scores[i])}
                if gold is not None:
                    row["gold"] = float(gold[i])
                f.write(json.dumps(row) + "\n")
                esc = lambda s: s.replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {esc(prompts[i])} | {esc(responses[i])} | {float(scores[i]):.3f} | "
                             f"{float(raw_scores[i]):.3f} |" + (f" {float(gold[i]):.3f} |" if gold is not None else ""))
        return "\n".join(lines)
