"""Reward-hacking guard for the RL trainers (PPO and its relatives): watch the proxy reward together with KL and
(when given) a held-out/gold scorer.

    guard = RewardHackingGuard(kl_budget=10.0, window=5, action="warn")
    alerts = guard.update(step, proxy=reward_mean, kl=kl_mean, gold=gold_mean_or_None)
    alerts = guard.observe(step, metrics)   # the same from a trainer's metrics, each alarm issued as a warning
    if guard.should_stop: ...
    reason = reward_threshold_stop(raw_means, threshold, window)   # the other stop test: a str, or None

Two alarms (Gao et al. 2022: the proxy keeps rising while the true reward peaks and falls):
- **divergence**: over the last `window` updates the proxy reward's least-squares slope is significantly > 0 while the
  held-out score's slope is significantly < 0 (needs a gold scorer). "Significantly": the slope's t-statistic
  (slope / its standard error from the regression residuals) passes `min_t`, by default the one-sided 95% critical
  value of Student's t with window - 2 degrees of freedom (2.35 for the default window of 5). Without it, batch noise
  alone fired the alarm: two flat, noisy series have opposite slope signs about a quarter of the time (half the time
  when the gold score mirrors the proxy), so action="stop" ended runs a few updates in, before anything was hacked.
  `min_t=0` restores the bare sign test;
- **KL budget**: the mean per-sequence KL to the reference exceeds `kl_budget` nats.
The trainer feeds it the **raw** proxy score (`reward/raw_mean`, the reward model's own output, before
normalisation, clipping and the no-EOS penalty) and the gold score (`reward/gold_mean`).
Each alarm is returned as a message (the trainer issues it as a `RewardHackingWarning` and logs it to events.jsonl and
TensorBoard);
with action="stop" training stops with `stop_reason` "reward-hacking guard: <message>".

`SampleTable` writes every N updates a table of prompts, responses and rewards to `samples.jsonl` (one JSON object
per row, with the update step) so that a person can read what the policy is doing.
"""
from __future__ import annotations

import json
import warnings
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from alignloop.errors import ConfigError


class RewardHackingWarning(UserWarning):
    """Issued (by `RewardHackingGuard.observe`) for each alarm of the RewardHackingGuard."""


# one-sided 95% critical values of Student's t by degrees of freedom (beyond 30: the normal 1.645)
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746, 17: 1.740, 18: 1.734, 19: 1.729,
        20: 1.725, 25: 1.708, 30: 1.697}


def t95(df: int) -> float:
    if df in _T95:
        return _T95[df]
    if df > 30:
        return 1.645
    return _T95[max(k for k in _T95 if k < df)]  # 21..29: the next smaller tabulated df (slightly conservative)


def _slope(ys: list[float]) -> float:
    n = len(ys)
    if n < 2:
        return 0.0
    xm = (n - 1) / 2
    ym = sum(ys) / n
    num = sum((i - xm) * (y - ym) for i, y in enumerate(ys))
    den = sum((i - xm) ** 2 for i in range(n))
    return num / den


def _slope_t(ys: list[float]) -> tuple[float, float]:
    """(least-squares slope, its t-statistic); t = ±inf for an exact nonzero line, 0 for a flat one."""
    n = len(ys)
    b = _slope(ys)
    if n < 3:
        return b, 0.0
    xm, ym = (n - 1) / 2, sum(ys) / n
    sxx = sum((i - xm) ** 2 for i in range(n))
    ssr = sum((y - (ym + b * (i - xm))) ** 2 for i, y in enumerate(ys))
    se = (ssr / (n - 2) / sxx) ** 0.5
    if se <= 1e-12 * max(1.0, abs(ym)):
        return b, (float("inf") if b > 0 else float("-inf") if b < 0 else 0.0)
    return b, b / se


class RewardHackingGuard:
    def __init__(self, kl_budget: float | None = None, window: int = 5, action: str = "warn",
                 min_t: float | None = None):
        if action not in ("warn", "stop"):
            raise ConfigError(f"guard_action must be warn or stop, got {action!r}")
        if window < 3:
            raise ConfigError(f"guard_window must be >= 3 (a trend's noise needs window - 2 >= 1 degrees of "
                              f"freedom), got {window}")
        if min_t is not None and min_t < 0:
            raise ConfigError(f"guard_min_t must be >= 0, got {min_t}")
        self.kl_budget, self.window, self.action = kl_budget, window, action
        self.min_t = t95(window - 2) if min_t is None else float(min_t)
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
            (sp, tp), (sg, tg) = _slope_t(list(self.proxy)), _slope_t(list(self.gold))
            if sp > 0 and sg < 0 and tp >= self.min_t and tg <= -self.min_t:
                msgs.append(f"update {step}: possible reward hacking: proxy reward rising (slope {sp:+.4f}/update, "
                            f"t {tp:+.1f}) while the held-out score falls (slope {sg:+.4f}/update, t {tg:+.1f}) over "
                            f"{self.window} updates")
        for m in msgs:
            self.alerts.append((step, m))
        if msgs and self.action == "stop":
            self.should_stop = True
        return msgs

    def observe(self, step: int, metrics: dict[str, float]) -> list[str]:
        """`update` from an RL trainer's metrics of one update: `reward/raw_mean` (the proxy), `objective/kl` and,
        when there is a gold scorer, `reward/gold_mean`. Each alarm is also issued as a RewardHackingWarning."""
        msgs = self.update(step, metrics["reward/raw_mean"], metrics["objective/kl"], metrics.get("reward/gold_mean"))
        for msg in msgs:
            warnings.warn(msg, RewardHackingWarning, stacklevel=3)
        return msgs

    def state_dict(self) -> dict:
        return {"proxy": list(self.proxy), "gold": list(self.gold), "alerts": list(self.alerts)}

    def load_state_dict(self, state: dict) -> None:
        self.proxy = deque(state["proxy"], maxlen=self.window)
        self.gold = deque(state["gold"], maxlen=self.window)
        self.alerts = [tuple(a) for a in state["alerts"]]


def reward_threshold_stop(raw_means: Sequence[float], threshold: float | None, window: int) -> str | None:
    """The stop reason once the moving average of the last `window` raw mean scores reaches `threshold` (None
    before the window has filled, below it, or without a threshold)."""
    recent = list(raw_means)[-window:]
    if threshold is None or len(recent) < window or not recent:
        return None
    average = sum(recent) / len(recent)
    return f"reward threshold: moving average {average:.4f} >= {threshold}" if average >= threshold else None


def _escape_cell(text: str) -> str:
    """A markdown table cell: pipes escaped, newlines as spaces."""
    return text.replace("|", "\\|").replace("\n", " ")


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
                lines.append(f"| {_escape_cell(prompts[i])} | {_escape_cell(responses[i])} | {float(scores[i]):.3f} | "
                             f"{float(raw_scores[i]):.3f} |" + (f" {float(gold[i]):.3f} |" if gold is not None else ""))
        return "\n".join(lines)
