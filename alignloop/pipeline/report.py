"""The run report: `report.md` and `report.html` in the run folder, plots rendered to PNG in `plots/`.

Reads only the run folder, through `RunFolder` (stage markers, metrics.jsonl of the trainers, labeling quality,
eval results), so it can be rebuilt at any time: `write_report("runs/demo")`.
"""
from __future__ import annotations

import html
import itertools
import math
from pathlib import Path

import numpy as np
import yaml

from alignloop.pipeline.run_folder import RunFolder, read_json, read_jsonl


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            xs.append(r.get("step", len(xs)))
            ys.append(v)
    return xs, ys


def _plt():
    """pyplot on the non-interactive Agg backend, chosen only when a report is drawn: importing the pipeline must not
    change the backend of a user's notebook."""
    import matplotlib  # noqa: PLC0415 - see the docstring

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - see the docstring

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ppo(run: RunFolder, out: Path) -> Path | None:
    rows = []
    r = 1
    while (run.ppo_dir(r) / "metrics.jsonl").exists():
        rows.append((r, read_jsonl(run.ppo_dir(r) / "metrics.jsonl")))
        r += 1
    if not rows:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for rnd, m in rows:
        tag = f" (round {rnd})" if len(rows) > 1 else ""
        for key, label in (("reward/raw_mean", "reward model score"), ("reward/gold_mean", "gold score")):
            xs, ys = _series(m, key)
            if xs:
                a1.plot(xs, ys, label=label + tag, marker="." if len(xs) < 30 else None)
        xs, ys = _series(m, "objective/kl")
        if xs:
            a2.plot(xs, ys, label="KL(policy ‖ SFT), nats per sequence" + tag)
    a1.set(title="PPO: reward over training", xlabel="PPO update", ylabel="mean score of the batch's samples")
    a2.set(title="PPO: KL to the reference over training", xlabel="PPO update", ylabel="KL (nats / sequence)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="best")
    return _save(plt, fig, out / "ppo_training.png")


COLORS = {"SFT": "black", "PPO": "tab:blue", "DPO": "tab:red", "KTO": "tab:orange", "RS": "tab:purple",
          "RLOO": "tab:cyan", "GRPO": "tab:olive", "Online DPO": "tab:pink", "SL-CAI": "tab:brown",
          "RL-CAI": "darkgoldenrod"}


def plot_critic_free(run: RunFolder, out: Path) -> Path | None:
    """RLOO / GRPO / online DPO (no critic) over training, as `plot_ppo`: reward-model and gold score of each
    update's samples, KL to the reference (objective/kl, nats per sequence)."""
    rows = [(name, read_jsonl(run.path(stage) / "metrics.jsonl")) for name, stage in run.ONLINE]
    rows = [(name, m) for name, m in rows if m]
    if not rows:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in rows:
        for key, label, ls in (("reward/raw_mean", "reward model score", "--"),
                               ("reward/gold_mean", "gold score", "-")):
            xs, ys = _series(m, key)
            if xs:
                a1.plot(xs, ys, ls, color=COLORS[name], label=f"{name}: {label}")
        xs, ys = _series(m, "objective/kl")
        if xs:
            a2.plot(xs, ys, color=COLORS[name], label=f"{name}: KL(policy ‖ SFT)")
    names = " / ".join(name for name, _ in rows)
    a1.set(title=f"{names}: reward over training", xlabel="update", ylabel="mean score of the batch's samples")
    a2.set(title=f"{names}: KL to the reference over training", xlabel="update", ylabel="KL (nats / sequence)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="best")
    return _save(plt, fig, out / "critic_free_training.png")


def _moving_average(v: list[float], w: int) -> list[float]:
    return [sum(v[max(0, i - w + 1):i + 1]) / len(v[max(0, i - w + 1):i + 1]) for i in range(len(v))]


def plot_dpo(run: RunFolder, out: Path) -> Path | None:
    m = read_jsonl(run.dpo_dir / "metrics.jsonl")
    if not m:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("rewards/chosen", "implicit reward, chosen"), ("rewards/rejected", "implicit reward, rejected"),
                       ("rewards/margins", "margin (chosen − rejected)")):
        xs, ys = _series(m, key)
        if xs:
            a1.plot(xs, ys, label=label)
    a1.set(title="DPO: implicit reward β·log(π/π_ref) over training", xlabel="optimizer step",
           ylabel="implicit reward (train batch)")
    beta = None
    cfg = run.dpo_dir / "config.yaml"
    if cfg.exists():
        beta = (yaml.safe_load(cfg.read_text()) or {}).get("beta")
    beta = beta or 0.1
    for key, label in (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")):
        xs, ys = _series(m, key)
        if xs:
            a2.plot(xs, [-y / beta for y in ys], label=f"log π_ref/π on {label} completions")
    xs, ys = _series(m, "loss/dpo") if _series(m, "loss/dpo")[0] else _series(m, "loss")
    a2.set(title="DPO: sequence log-ratio to the reference (a KL proxy)", xlabel="optimizer step",
           ylabel="log π_ref(y|x) − log π(y|x) (nats)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    return _save(plt, fig, out / "dpo_training.png")


def plot_frontier(run: RunFolder, res: dict, out: Path) -> Path | None:
    """Gold reward against KL for every method; without a gold scorer, the reward model's score instead."""
    if not res or not res.get("summary"):
        return None
    summ = res["summary"]
    key = "gold" if "gold/mean" in summ.get("SFT", {}) else "rm" if "rm/mean" in summ.get("SFT", {}) else None
    if key is None:
        return None
    what = "gold score" if key == "gold" else "reward-model score (no gold scorer given)"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    bon = res.get("best_of_n") or {}
    if bon:
        ns = sorted(bon, key=int)
        ax.plot([bon[n]["kl"] for n in ns], [bon[n][f"{key}/mean"] for n in ns], "o-", color="tab:green",
                label="best-of-N (KL = log N − (N−1)/N)")
        for n in ns:
            ax.annotate(f"N={n}", (bon[n]["kl"], bon[n][f"{key}/mean"]), textcoords="offset points",
                        xytext=(-30, 4), fontsize=8, color="tab:green")
    mkey = "reward/gold_mean" if key == "gold" else "reward/raw_mean"
    curves = [("PPO", run.ppo_dir(max(1, run.rounds())))] + [(name, run.path(stage)) for name, stage in run.ONLINE] \
        + [("RL-CAI", run.path(run.RL_CAI))]
    for name, folder in curves:   # the RL runs' training batches: where they went on the way
        m = read_jsonl(folder / "metrics.jsonl")
        xs = [r["objective/kl"] for r in m if "objective/kl" in r and mkey in r]
        ys = [r[mkey] for r in m if "objective/kl" in r and mkey in r]
        if xs:
            w = min(5, len(xs))
            ax.plot(_moving_average(xs, w), _moving_average(ys, w), "-", color=COLORS[name], alpha=0.45,
                    label=f"{name} during training (train batches, {w}-update moving average)")
    for name, s in summ.items():
        if name.startswith("best-of") or "kl" not in s or f"{key}/mean" not in s:
            continue
        ax.errorbar([s["kl"]], [s[f"{key}/mean"]], yerr=[s.get(f"{key}/sem", 0) or 0], fmt="s", ms=9, capsize=3,
                    color=COLORS.get(name, "gray"), label=f"{name} (held-out prompts)")
    ax.set(title=f"{what.split(' (')[0].capitalize()} against KL to the SFT model (reward–KL frontier)",
           xlabel="KL(policy ‖ SFT) on the policy's samples (nats / sequence)", ylabel=f"mean {what}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(plt, fig, out / "frontier.png")


def plot_best_of_n(res: dict, out: Path) -> Path | None:
    bon = (res or {}).get("best_of_n") or {}
    if not bon:
        return None
    plt = _plt()
    ns = sorted(bon, key=int)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label in (("gold/mean", "gold score"), ("rm/mean", "reward-model score")):
        if key in bon[ns[0]]:
            ax.errorbar([int(n) for n in ns], [bon[n][key] for n in ns],
                        yerr=[bon[n].get(key.replace("mean", "sem"), 0) or 0 for n in ns], marker="o", capsize=3,
                        label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(n) for n in ns])
    ax.set_xticklabels(ns)
    ax.set(title="Best-of-N from the SFT model, picked by the reward model", xlabel="N (log scale)",
           ylabel="mean score of the picked sample")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, out / "best_of_n.png")


def plot_rm(quality: dict | None, rm_info: dict | None, rm_rows: list[dict], out: Path) -> Path | None:
    if not rm_info:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    xs, ys = _series(rm_rows, "eval/accuracy")
    if xs:
        a1.plot(xs, ys, "o-", label="held-out accuracy")
    a1.set(title="Reward model: held-out pairwise accuracy", xlabel="optimizer step", ylabel="accuracy")
    a1.set_ylim(0.4, 1.0)
    a1.axhline(0.5, color="gray", ls=":", label="chance")
    a1.grid(alpha=0.3)
    a1.legend()
    bars, vals = [], []
    if rm_info.get("eval/accuracy") is not None:
        bars.append("RM held-out\naccuracy")
        vals.append(rm_info["eval/accuracy"])
    if quality:
        if quality.get("mean_loo_agreement_unflagged") is not None:
            bars.append("labeler vs others'\nmajority (LOO)")
            vals.append(quality["mean_loo_agreement_unflagged"])
        if quality.get("pairwise_percent_agreement") is not None:
            bars.append("labeler-labeler\nagreement")
            vals.append(quality["pairwise_percent_agreement"])
    a2.bar(bars[:1], vals[:1], color="tab:orange", label="reward model (held-out prompts)")
    if len(bars) > 1:
        a2.bar(bars[1:], vals[1:], color="tab:blue", label="simulated or human labelers")
    for i, v in enumerate(vals):
        a2.text(i, v + 0.01, f"{v:.2f}", ha="center")
    a2.set(title="Reward-model accuracy vs labeler agreement", ylabel="share of agreeing pairs",
           xlabel="agreement measure")
    a2.legend(loc="lower right", fontsize=8)
    a2.set_ylim(0, 1.05)
    a2.grid(alpha=0.3, axis="y")
    return _save(plt, fig, out / "reward_model.png")


def plot_labelers(quality: dict | None, out: Path) -> Path | None:
    if not quality or not quality.get("stats"):
        return None
    plt = _plt()

    stats = quality["stats"]
    names = list(stats)
    flagged = set(quality.get("flagged", []))
    x = np.arange(len(names))
    w = 0.27
    fig, ax = plt.subplots(figsize=(8, 4.2))
    loo = [stats[n].get("agreement") or 0 for n in names]
    left = [stats[n].get("left_share") or 0 for n in names]
    ga = quality.get("gold_agreement") or {}
    ax.bar(x - w, loo, w, label="agreement with the others' majority")
    if ga:
        ax.bar(x, [ga.get(n, 0) for n in names], w, label="agreement with the hidden gold scorer")
    ax.bar(x + w, left, w, label="share of 'left' picks")
    ax.axhline(0.5, color="gray", ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels([n + ("\n(FLAGGED)" if n in flagged else "") for n in names])
    for t, n in zip(ax.get_xticklabels(), names, strict=True):
        if n in flagged:
            t.set_color("red")
    ax.set(title="Labeler quality (flagged labelers in red)", xlabel="labeler", ylabel="share")
    ax.set_ylim(0, 1.3)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, out / "labelers.png")


def plot_times(times: dict, out: Path) -> Path | None:
    if not times:
        return None
    plt = _plt()
    names = list(times)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    ax.barh(names, [times[n] for n in names], color="tab:gray", label="wall time")
    for i, n in enumerate(names):
        ax.text(times[n], i, f" {times[n]:.0f}s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(title=f"Wall time per stage (total {sum(times.values()) / 60:.1f} min)", xlabel="seconds",
           ylabel="stage")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return _save(plt, fig, out / "stage_times.png")


def fmt(v, nd=3) -> str:
    """A report cell: a float with `nd` decimals, None or NaN as a dash, anything else as text."""
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{nd}f}"
    return str(v)


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (the reports' one): each cell through `fmt`, its pipes and newlines escaped."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_report(root: str | Path, notes: list[str] | None = None) -> dict:
    """Render plots and write report.md / report.html. Returns {"markdown", "html", "plots"}."""
    run = RunFolder(root, create=False)
    run.plots_dir.mkdir(parents=True, exist_ok=True)
    times = run.timings()
    res = run.results()
    rnd = max(run.rounds(), 1)
    quality = read_json(run.quality(1))
    rm_info = run.info(run.round_stage(rnd, "rm"))
    rm_rows = read_jsonl(run.rm_dir(rnd) / "metrics.jsonl")
    plots = {}
    for name, fn in (("ppo", lambda: plot_ppo(run, run.plots_dir)),
                     ("critic_free", lambda: plot_critic_free(run, run.plots_dir)),
                     ("dpo", lambda: plot_dpo(run, run.plots_dir)),
                     ("frontier", lambda: plot_frontier(run, res, run.plots_dir)),
                     ("best_of_n", lambda: plot_best_of_n(res, run.plots_dir)),
                     ("reward_model", lambda: plot_rm(quality, rm_info, rm_rows, run.plots_dir)),
                     ("labelers", lambda: plot_labelers(quality, run.plots_dir)),
                     ("times", lambda: plot_times(times, run.plots_dir))):
        p = fn()
        if p is not None:
            plots[name] = p.relative_to(run.root).as_posix()

    md = ["# alignloop run report", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    summ = res.get("summary", {})
    per_round = [q for q in (read_json(run.quality(r)) for r in range(1, run.rounds() + 1)) if q]
    md += _checks(summ, res.get("best_of_n") or {}, quality, rm_info, times, per_round)
    md += _results_section(res)
    md += _people_section(run, per_round)
    md += _ai_section(run, quality, summ)
    md += _plot_sections(plots, quality, rm_info)
    if times:
        md += [table(["stage", "wall time (s)"], [[k, f"{v:.1f}"] for k, v in times.items()]
                      + [["total", f"{sum(times.values()):.1f}"]]), ""]
    md += _sample_section(run, summ)
    text = "\n".join(md)
    run.report_md.write_text(text)
    run.report_html.write_text(md_to_html(text))
    return {"markdown": str(run.report_md), "html": str(run.report_html), "plots": plots}


def _results_section(res: dict) -> list[str]:
    summ = res.get("summary", {})
    if not summ:
        return []
    md = ["## Results on held-out prompts", "",
          f"{res.get('prompts')} held-out prompts × {res.get('samples_per_prompt')} sample(s). Gold = the "
          f"hidden scorer `{res.get('gold')}` (no training stage saw it); RM = the learned reward model. Win "
          "rates are against independent SFT samples on the same prompts (ties ½). KL = Σ_t log π/π_SFT on the "
          "policy's samples (best-of-N: the analytic log N − (N−1)/N).", ""]
    rows = [[name, fmt(s.get("gold/mean")) + (f" ± {fmt(s.get('gold/sem'))}" if "gold/sem" in s else ""),
             fmt(s.get("gold/win_rate"), 2), fmt(s.get("rm/mean")), fmt(s.get("rm/win_rate"), 2),
             fmt(s.get("kl"), 2), fmt(s.get("length"), 1)] for name, s in summ.items()]
    md += [table(["method", "gold reward", "gold win rate vs SFT", "RM reward", "RM win rate vs SFT",
                   "KL to SFT", "length (tokens)"], rows), ""]
    bon = res.get("best_of_n") or {}
    if bon:
        md += ["### Best-of-N (SFT samples picked by the reward model)", "",
               table(["N", "gold reward", "RM reward", "KL bound"],
                      [[n, fmt(bon[n].get("gold/mean")), fmt(bon[n].get("rm/mean")), fmt(bon[n].get("kl"), 2)]
                       for n in sorted(bon, key=int)]), ""]
    return md


def _people_section(run: RunFolder, per_round: list[dict]) -> list[str]:
    """What people wrote and said beyond pairwise labels: the demonstrations SFT trained on, and each conversation
    round's figures (conversations, turns, pairs from the chosen turns, the mean 1-7 rating)."""
    md: list[str] = []
    sft = run.info(run.SFT) or {}
    if sft.get("demonstrations"):
        md += ["## Demonstrations", "",
               f"SFT trained on {sft['demonstrations']} demonstrations people wrote (of {sft.get('train_rows')} "
               f"rows; sft/train_rows.jsonl).", ""]
    rounds = [(i, q) for i, q in enumerate(per_round, 1) if q.get("task_type") == "conversation"]
    if rounds:
        md += ["## Conversations", "",
               "People conversed with each round's policy, choosing the better of two replies at each turn on the "
               "8-point scale; each choice is a preference pair (its strength the margin).", "",
               table(["round", "conversations", "turns", "pairs", "ended (rated)", "mean rating (1-7)", "strengths"],
                     [[i, q.get("conversations"), q.get("turns"), q.get("pairs"), q.get("ended"),
                       fmt(q.get("mean_rating"), 2),
                       ", ".join(f"{k} {v}" for k, v in (q.get("strengths") or {}).items()) or "–"]
                      for i, q in rounds]), ""]
    return md


def _ai_section(run: RunFolder, quality: dict | None, summ: dict) -> list[str]:
    """AI feedback: the AI labeler against the gold scorer and the people (one order vs both), the RL-CAI reward
    model, SL-CAI / RL-CAI against SFT and the policies trained on people's labels, critique -> revision examples."""
    ai = (quality or {}).get("ai")
    if not ai:
        return []
    judged = run.info(run.round_stage(1, "judge")) or {}
    people = ai.get("people") or {}
    md = ["## AI feedback (round 1)", "",
          f"The AI labeler `{judged.get('labeler')}` ({judged.get('model')}) judged {judged.get('pairs')} pairs "
          f"against the constitution, scored by the log-probabilities of the answers "
          f"({'both orders averaged' if judged.get('both_orders') else 'one order'}; principles: "
          f"{judged.get('principles')}). The two orders agree on {fmt(judged.get('order_consistency'), 2)} of the "
          f"pairs. People agree with each other on {fmt((people.get('humans') or {}).get('agreement'), 2)} of "
          f"the pairs they both judged.", ""]
    rows = []
    for name, d in (people.get("ai") or {}).items():
        g = (ai.get("by_order") or {}).get(name, {})
        pos = d.get("position") or {}
        rows.append([name, g.get("gold/pairs"), fmt(g.get("gold/single_order"), 2), fmt(g.get("gold/both_orders"), 2),
                     fmt(g.get("people/single_order"), 2), fmt(g.get("people/both_orders"), 2),
                     fmt(d.get("majority_kappa"), 2), fmt(d.get("human_agreement"), 2), fmt(pos.get("before"), 2),
                     fmt(pos.get("after"), 2)])
    md += [table(["AI labeler", "pairs (gold differs)", "agrees with gold: one order", "with gold: both orders",
                   "with people's majority: one order", "with people's majority: both orders",
                   "κ with people's majority", "with each person (both orders)", "picks first shown: one order",
                   "picks first shown: both orders"], rows), ""]
    rm_ai = run.info(run.RL_CAI_RM)
    if rm_ai:
        md += [f"RL-CAI reward model: {rm_ai.get('pairs')} AI-labelled pairs, held-out accuracy (against AI labels) "
               f"{fmt(rm_ai.get('eval/accuracy'))}.", ""]
    names = [n for n in ("SFT", "PPO", "RLOO", "DPO", "SL-CAI", "RL-CAI") if n in summ]
    if any(n in summ for n in ("SL-CAI", "RL-CAI")):
        md += [table(["policy", "feedback", "gold reward", "gold win rate vs SFT", "AI win rate vs SFT", "KL to SFT"],
                      [[n, "AI" if "CAI" in n else "–" if n == "SFT" else "people", fmt(summ[n].get("gold/mean")),
                        fmt(summ[n].get("gold/win_rate"), 2), fmt(summ[n].get("ai/win_rate"), 2),
                        fmt(summ[n].get("kl"), 2)] for n in names]), ""]
    chains = read_jsonl(run.path(run.SL_CAI) / "chains.jsonl")[:3]
    if chains:
        md += ["### Critique → revision (SL-CAI, the model's own)", ""]
        for c in chains:
            rows = [["response", c.get("initial", "").strip()]]
            for step in c.get("chain", []):
                rows += [[f"critique ({step.get('principle')})", str(step.get("critique", "")).strip()],
                         ["revision", str(step.get("revision", "")).strip() or "(empty: kept the response)"]]
            md += [f"**{c.get('prompt', '')}**", "", table(["step", "text"], rows), ""]
    return md


def _plot_sections(plots: dict, quality: dict | None, rm_info: dict | None) -> list[str]:
    if quality and quality.get("task_type") == "conversation":   # no labeler agreement: own conversations each
        quality = None
    md = []
    for key, title in (("frontier", "Reward against KL (the reward–KL frontier)"), ("best_of_n", "Best-of-N"),
                       ("ppo", "PPO training"), ("critic_free", "RLOO / GRPO / online DPO training"),
                       ("dpo", "DPO training"), ("reward_model", "Reward model"), ("labelers", "Labelers"),
                       ("times", "Wall time per stage")):
        if key in plots:
            md += [f"## {title}", "", f"![{title}]({plots[key]})", ""]
        if key == "reward_model" and rm_info:
            md += [f"Reward model: {rm_info.get('pairs')} preference pairs, held-out accuracy "
                   f"{fmt(rm_info.get('eval/accuracy'))}."
                   + (f" For comparison, two (unflagged) labelers agree on "
                      f"{fmt(quality.get('pairwise_percent_agreement'))} of the pairs they both judged, and a "
                      f"labeler agrees with the others' majority on {fmt(quality.get('mean_loo_agreement_unflagged'))}"
                      f": held-out labels are that noisy, so a reward model's accuracy on them stays near these "
                      f"figures (InstructGPT reports the same)." if quality else ""), ""]
        if key == "labelers" and quality:
            md += _labeler_table(quality)
    return md


def _labeler_table(quality: dict) -> list[str]:
    rows = [[w, d["n"], fmt(d.get("agreement"), 2), fmt((quality.get("gold_agreement") or {}).get(w), 2),
             fmt(d.get("left_share"), 2), fmt(d.get("position_p"), 4),
             "; ".join(quality["flags"].get(w, [])) or "–"] for w, d in quality["stats"].items()]
    return [table(["labeler", "judgements", "agreement (LOO)", "agreement with gold", "left share",
                    "position p-value", "flags"], rows), "",
            "Project agreement: " + ", ".join(f"{k} {fmt(v)}" for k, v in
                                               (quality.get("project_agreement") or {}).items()), ""]


def _sample_section(run: RunFolder, summ: dict) -> list[str]:
    """Sample completions before / after, on the same held-out prompts."""
    ref = read_jsonl(run.eval_samples("SFT"))
    if not ref:
        return []
    md = ["## Sample completions (same held-out prompts)", ""]
    others = {m: read_jsonl(run.eval_samples(m)) for m in summ if m != "SFT"}
    for i in range(min(4, len(ref))):
        md += [f"**{ref[i]['prompt']}**", ""]
        rows = [["SFT (before)", ref[i]["response"].strip(), fmt(ref[i].get("gold"), 1), fmt(ref[i].get("rm"), 2)]]
        for m, rs in others.items():
            if i < len(rs):
                rows.append([m, rs[i]["response"].strip(), fmt(rs[i].get("gold"), 1), fmt(rs[i].get("rm"), 2)])
        md += [table(["model", "completion", "gold", "RM"], rows), ""]
    return md


def _checks(summ: dict, bon: dict, quality: dict | None, rm_info: dict | None, times: dict,
            per_round: list[dict] | None = None) -> list[str]:
    """The headline: what the loop is expected to show, and whether this run shows it."""
    lines = []
    sft = summ.get("SFT", {}).get("gold/mean")
    for m in ("PPO", "RLOO", "GRPO", "Online DPO", "DPO", "KTO", "RS"):
        if sft is not None and m in summ and "gold/mean" in summ[m]:
            g = summ[m]["gold/mean"]
            lines.append(f"- {m} {'raises' if g > sft else 'does NOT raise'} the gold reward over SFT: {sft:.2f} → "
                         f"{g:.2f} (win rate {summ[m].get('gold/win_rate', float('nan')):.2f}, KL "
                         f"{summ[m].get('kl', float('nan')):.2f} nats)")
    ppo = summ.get("PPO", {})
    for m in ("RLOO", "GRPO", "Online DPO"):   # against PPO on the frontier: as much gold for no more KL?
        s = summ.get(m, {})
        if "gold/mean" in s and "gold/mean" in ppo and "kl" in s and "kl" in ppo:
            better = s["gold/mean"] >= ppo["gold/mean"] and s["kl"] <= ppo["kl"]
            lines.append(f"- {m} {'matches or beats' if better else 'does NOT match'} PPO at no more KL: gold "
                         f"{s['gold/mean']:.2f} at KL {s['kl']:.2f} nats vs PPO's {ppo['gold/mean']:.2f} at "
                         f"{ppo['kl']:.2f}")
    if bon and "gold/mean" in next(iter(bon.values())):
        ns = sorted(bon, key=int)
        golds = [bon[n]["gold/mean"] for n in ns]
        rising = all(b >= a for a, b in itertools.pairwise(golds))
        lines.append(f"- best-of-N {'rises' if rising else 'does NOT rise monotonically'} with N: "
                     + ", ".join(f"N={n}: {bon[n]['gold/mean']:.2f}" for n in ns))
    conversations = (quality or {}).get("task_type") == "conversation"
    if quality and not conversations:
        flagged = quality.get("flagged") or []
        reasons = "; ".join(f"{w}: {', '.join(quality['flags'].get(w, []))}" for w in flagged)
        lines.append(f"- flagged labelers: {', '.join(flagged) if flagged else 'none'}" + (f" ({reasons})" if reasons
                                                                                             else ""))
    if rm_info and conversations and rm_info.get("eval/accuracy") is not None:
        lines.append(f"- reward model held-out accuracy {rm_info['eval/accuracy']:.2f} on the conversations' turns "
                     f"(prompts never trained on)")
    elif rm_info and quality and rm_info.get("eval/accuracy") is not None:
        agree = ", ".join(f"{fmt(q.get('pairwise_percent_agreement'), 2)} (round {i})"
                          for i, q in enumerate(per_round or [quality], 1))
        lines.append(f"- reward model held-out accuracy {rm_info['eval/accuracy']:.2f} (prompts never trained on) vs "
                     f"labeler-labeler agreement {agree}")
    if times:
        lines.append(f"- wall time: {sum(times.values()) / 60:.1f} min over {len(times)} stages")
    return (["## Summary", ""] + lines + [""]) if lines else []


def md_to_html(md: str) -> str:
    """A small converter for the subset the report uses: headings, tables, images, bold lines, list items."""
    body, pending = [], []

    def flush():
        if pending:
            head = [c.strip() for c in pending[0].strip("|").split(" | ")]
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead>"
                        "<tbody>" + "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in
                                                            r.strip().strip("|").split(" | ")) + "</tr>"
                                            for r in pending[2:]) + "</tbody></table>")
            pending.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            pending.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}"></p>')
        elif line.startswith("- "):
            body.append(f"<ul><li>{html.escape(line[2:])}</li></ul>")
        elif line.startswith("**") and line.endswith("**"):
            body.append(f"<p><b>{html.escape(line.strip('*'))}</b></p>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "font-size:14px;text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>alignloop run report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
