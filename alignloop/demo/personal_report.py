"""The personalization demo's report (`alignloop demo --personal`, `alignloop.demo.personal`): report.md,
report.html, results.json and plots/fewshot.png in the run folder, from the finished stages' markers (their infos:
"samples", "labels", "rm_eval", "fewshot", "eval", and the trainers' "rm_single", "rm_personal", "policy_generic",
"policy_personal")."""
from __future__ import annotations

import json
from pathlib import Path

from alignloop.pipeline import RunFolder
from alignloop.pipeline.report import fmt, md_to_html, table

COMMAND = "alignloop demo --personal"


def rm_table(acc: dict, groups_of: list[str]) -> str:
    """Rows: each model; columns: each group's accuracy against its labelers' held-out labels and against its
    gold."""
    models = [m for m in acc if m != "pairs"]
    headers = ["reward model"] + [f"{g}: {what}" for g in groups_of for what in ("labels", "gold")]
    return table(headers, [[m] + [acc[m][g][what] for g in groups_of for what in ("labels", "gold")]
                           for m in models])


def fewshot_table(groups: dict, ks: list[int]) -> str:
    groups_of = list(groups)
    headers = ["judgements k"] + [f"{g}: {what}" for g in groups_of for what in ("labels", "gold")]
    rows = [[f"{k}" + (" (population model)" if k == 0 else "")]
            + [groups[g][str(k)][what] for g in groups_of for what in ("labels", "gold")] for k in ks]
    rows.append(["single reward model"] + [groups[g]["single"][what] for g in groups_of
                                           for what in ("labels", "gold")])
    return table(headers, rows)


def needed_sentence(groups: dict) -> str:
    groups_of, parts = list(groups), []
    for g in groups_of:
        n = groups[g]["needed"]["labels"]
        base = groups[g]["0"]["labels"]
        parts.append(f"a new {g} user needs {n} judgement{'s' if n != 1 else ''} before the few-shot model beats the "
                     f"population model ({fmt(base)}) on their held-out judgements" if n is not None else
                     f"for a new {g} user the few-shot model does not stay above the population model ({fmt(base)}) "
                     f"up to the largest k")
    return "; ".join(parts) + "."


def policy_tables(policies: dict, groups_of: list[str]) -> tuple[str, str]:
    """(each group's gold of SFT / generic / personalized given the group's tag; every policy x every gold)."""
    by_group = table(["group", "SFT", "generic policy", "personalized policy (own tag)"],
                     [[g, policies["SFT"][f"gold/{g}"], policies["generic policy"][f"gold/{g}"],
                       policies[f"personalized policy <user:{g}>"][f"gold/{g}"]] for g in groups_of])
    full = table(["policy", *[f"gold {g}" for g in groups_of], "length (tokens)", "example"],
                 [[name, *[v[f"gold/{g}"] for g in groups_of], v["length"], v["example"].strip()]
                  for name, v in policies.items()])
    return by_group, full


def plot_fewshot(groups: dict, ks: list[int], path: Path) -> Path:
    """Held-out accuracy against the new user's judgements k (symlog x), per group, with the population model."""
    import matplotlib  # noqa: PLC0415 - the backend is chosen only when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after the backend

    groups_of = list(groups)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [max(k, 0.5) for k in ks]
    for g, color in zip(groups_of, ("tab:orange", "tab:blue"), strict=True):
        ax.plot(xs, [groups[g][str(k)]["labels"] for k in ks], marker="o", color=color, label=f"new {g} users")
        ax.axhline(groups[g]["0"]["labels"], color=color, linestyle=":", linewidth=1)
        ax.axhline(groups[g]["single"]["labels"], color=color, linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("the new user's judgements fitted (k; 0 = the population model)")
    ax.set_ylabel("held-out accuracy (their own labels)")
    ax.set_title("Few-shot weights over the heads (dotted: population, dashed: single RM)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_personal_report(run: RunFolder, info: dict[str, dict], size: dict, command: str) -> dict:
    """report.md, report.html, plots/fewshot.png and results.json from the stages' infos (keys: the stage names)
    and the run's sizes (`PersonalSize` as a dict)."""
    acc = info["rm_eval"]["accuracy"]
    few = info["fewshot"]
    groups, ks = few["groups"], list(size["fewshot_ks"])
    groups_of = list(groups)
    policies = info["eval"]["policies"]
    smp, lab = info["samples"], info["labels"]
    plot = plot_fewshot(groups, ks, run.plots_dir / "fewshot.png")
    worst = min(groups_of, key=lambda g: acc["single"][g]["gold"])
    head = acc["personalized (group head)"][worst]
    verdict = (f"The single reward model orders the {worst} group's held-out pairs as its gold does "
               f"{fmt(acc['single'][worst]['gold'])} of the time ({fmt(acc['single'][worst]['labels'])} against its "
               f"labelers), the personalized model's {worst} head {fmt(head['gold'])} ({fmt(head['labels'])}); "
               + needed_sentence(groups))
    by_group, full = policy_tables(policies, groups_of)
    md = ["# Whose preferences: a single reward model against a personalized one", "",
          f"`{command}`: two simulated labeler populations with opposing hidden tastes judge the SFT model's movie "
          "reviews. **warm** wants warm, enthusiastic reviews (the default demo's gold); **critic** wants balanced, "
          "specific critiques (aspects named, praise and criticism both, no gushing closers). Each labeler is a "
          "noisy Bradley-Terry judge of its group's gold; each preference row carries `labeler` and "
          "`labeler_attributes.group`.", "",
          f"**{verdict}**", "",
          "## Data", "",
          table(["figure", "value"], [
              ["labeling prompts (training / held out)", f"{lab.get('train_prompts')} / {lab.get('heldout_prompts')}"],
              ["SFT completions (distinct, both golds)", smp.get("completions")],
              ["pairs the two golds order the same way (of pairs both order)", smp.get("gold_agreement")],
              ["training rows by group", " / ".join(f"{g} {lab.get(f'train_rows/{g}')}" for g in groups_of)],
              ["held-out rows", lab.get("heldout_rows")],
              ["new users' judgements (held-out pairs)", lab.get("new_user_rows")]]
              + [[f"labeler {n}: Bradley-Terry noise τ", t] for n, t in (lab.get("labelers") or {}).items()]), "",
          "## Reward models: held-out pairwise accuracy per group", "",
          "Against the group's labelers' judgements of the held-out prompts (labels) and against the group's gold on "
          "every held-out pair it orders (gold). Both models are the same trainer from the SFT model on the same "
          "rows; the personalized one has one head per group (a pair trains its labeler's group's head) and a "
          "population head (trained on every pair).", "",
          rm_table(acc, groups_of), "",
          "## Few-shot: a new user's weights over the heads", "",
          f"{few.get('users')} new users ({size['new_users']} per group, never in training) judge the held-out "
          f"pairs. For each k, the weights over the heads {', '.join(few.get('heads', []))} are fitted to k of their "
          f"judgements (`alignloop.personal.fit_user_weights`: logistic regression on the heads' score differences, "
          f"L2 {few.get('l2')} toward the population weights, so k = 0 is the population model) and scored on their "
          f"judgements of other prompts; the mean over {few.get('draws')} draws and the group's users.", "",
          f"**{needed_sentence(groups)}**", "",
          fewshot_table(groups, ks), "",
          f"![few-shot accuracy](plots/{plot.name})", "",
          "## Policies: each group's mean gold score", "",
          f"RLOO from the SFT model ({size['rl_updates']} updates of {size['rl_prompts']} prompts x "
          f"{size['rl_generations']} completions, learning rate {size['rl_learning_rate']}, KL coefficient "
          f"{size['rl_kl_coef']}; the same for both): the generic policy against the single reward "
          "model; the personalized policy on prompts tagged `<user:GROUP> ` against the personalized model, each "
          "prompt's reward the head of its tag (`OnlineRLArgs.user_tag`). Held-out prompts, "
          f"{info['eval'].get('samples_per_prompt')} samples each; the personalized policy is given each group's "
          "tag.", "",
          by_group, "", full, "",
          "## Stage times (s)", "",
          table(["stage", "seconds"], [[k, float(v)] for k, v in run.timings().items()]), ""]
    text = "\n".join(md)
    run.report_md.write_text(text)
    run.report_html.write_text(md_to_html(text))
    results = {"command": command, "verdict": verdict, "reward_models": acc, "fewshot": few, "policies": policies,
               "samples": smp, "labels": lab,
               "training": {s: info.get(s) for s in ("rm_single", "rm_personal", "policy_generic", "policy_personal")},
               "plot": str(plot), "size": size}
    (run.root / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return {"report": str(run.report_md), "html": str(run.report_html), "plot": str(plot), "verdict": verdict}
