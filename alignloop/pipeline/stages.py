"""The pipeline's stages, one function each: `stage_x(folder, cfg, ...) -> info` (what STAGE_DONE.json keeps).

Each reads its inputs from its arguments and writes into its own folder (`folder`, given by `RunFolder.stage`) and
the run's feedback store; `alignloop.pipeline.runner` chains them. Trainers are configured from the YAML sections
(`trainer_config`: their own dataclasses, one vocabulary) plus the fields the pipeline fixes (model, output_dir).

The evaluation stage: every policy against the SFT model, by the gold scorer and the reward model (and the AI
labeler, with an `ai_feedback` section). For each policy:
samples on the held-out prompts, mean gold and reward-model score, win rate against independent SFT samples on the
same prompts, KL to the SFT model (Σ_t k1 on the policy's samples), length. Best-of-N for each N of
`eval.best_of_n`: max(N) SFT candidates per prompt scored by the reward model once, the best of the first N kept;
its KL is the analytic log N − (N−1)/N (Beirami et al. 2024).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from alignloop.ai_feedback.cai import CAIConfig, ConstitutionalAI
from alignloop.ai_feedback.judge import ai_win_rate, judge_project, load_judge
from alignloop.data import groups_to_unpaired, load_records, read_rows, write_rows
from alignloop.errors import ConfigError, UserError
from alignloop.evaluation import best_of_n, first_of_each, load_policy, mean, sample_policy, score, summarize
from alignloop.feedback import quality
from alignloop.feedback.export import ExportOptions, export_records
from alignloop.feedback.importing import comparable_completions
from alignloop.feedback.store import Store
from alignloop.models import load_causal_lm, load_tokenizer
from alignloop.pipeline import people
from alignloop.pipeline.config import FeedbackSettings, PipelineConfig
from alignloop.pipeline.labelers import ai_agreement_by_order, default_labelers, gold_agreement, simulate_labeling
from alignloop.pipeline.run_folder import RunFolder
from alignloop.recipes.rejection_sampling import RejectionSamplingTrainer, RSConfig
from alignloop.scoring import load_function, load_scorer
from alignloop.trainers.dpo import DPOConfig, DPOTrainer
from alignloop.trainers.grpo import GRPOConfig, GRPOTrainer, RLOOConfig
from alignloop.trainers.kto import KTOConfig, KTOTrainer
from alignloop.trainers.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from alignloop.trainers.ppo import PPOConfig, PPOTrainer
from alignloop.trainers.rm import RewardConfig, RewardTrainer
from alignloop.trainers.sft import SFTConfig, SFTTrainer


def trainer_config(cls, section: dict | None, **fixed):
    """A trainer config from its dataclass defaults, the YAML section, then the pipeline's fixed fields."""
    values = {**(section or {}), **fixed}
    bad = sorted(set(values) - set(cls.__dataclass_fields__) - set(getattr(cls, "renamed_fields", {})))
    if bad:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(bad)}")
    return cls(**values)


def numbers(info: dict) -> dict:
    """The numeric entries of a metrics dict (what a stage marker keeps of a trainer's result)."""
    return {k: v for k, v in info.items() if isinstance(v, (int, float))}


# ------------------------------------------------------------------------------------------------ SFT, collection
def stage_sft(folder: Path, cfg: PipelineConfig, run: RunFolder | None = None) -> dict:
    """SFT of the starting policy on the `sft` section's rows, and on people's demonstrations (the `demonstrations`
    section: they come first; without an `sft` section, SFT's defaults train on them alone; the rows trained on are
    written to sft/train_rows.jsonl). In conversation mode the SFT model's tokenizer is saved with the chat template
    the app generates with (`people.chat_tokenizer`)."""
    section = dict(cfg.sft or {})
    section.setdefault("seed", cfg.seed)
    rows = section.pop("train_rows", None)
    chat = people.conversation_mode(cfg)
    info: dict = {}
    if cfg.demonstrations is not None:
        own_template = bool(getattr(load_tokenizer(cfg.policy), "chat_template", None))
        demos, summary = people.demonstration_rows(cfg, run, chat=chat or own_template)
        own = [dict(r) for r in rows or []]
        if section.get("train_file"):
            own += [dict(r) for r in read_rows(section.pop("train_file"))]
        rows = demos + own
        write_rows(rows, run.sft_rows)
        info = {"demonstrations": len(demos), "train_rows": len(rows), "rows_file": str(run.sft_rows),
                "demonstrations_export": summary}
    if rows is None and section.get("train_file"):  # read here: conversational rows need a chat template
        rows = [dict(r) for r in read_rows(section.pop("train_file"))]
    args = trainer_config(SFTConfig, section, model=cfg.policy, output_dir=str(folder))
    res = SFTTrainer(model=cfg.policy, args=args, train_dataset=rows,
                     tokenizer=people.chat_tokenizer(cfg.policy) if chat or is_conversational(rows) else None).train()
    return {"model": res.output_dir, "steps": res.steps, **info, **res.metrics}


def threshold_settings(fb: FeedbackSettings) -> dict:
    """Quality thresholds stored with the project (the app's dashboard and the export use the same ones).
    Simulated labelers answer instantly: the time-per-item test is for people only."""
    th = dict(fb.thresholds or {})
    if fb.labelers == "simulated":
        th.setdefault("min_median_seconds", 0.0)
    return th


def stage_sample(folder: Path, cfg: PipelineConfig, run: RunFolder, round_: int, policy: str,
                 train_prompts: list[str]) -> dict:
    """K completions for `feedback.num_prompts` prompts from `policy`, imported into the store as a project of
    `feedback.task_type` (pairwise or thumbs; empty samples are left out and identical ones kept once: they make
    an uninformative pair, or the same item twice; `samples_left_out` counts them)."""
    fb = cfg.feedback
    prompts = people.pick_prompts(train_prompts, fb.num_prompts, fb.seed + round_)
    model, tok = load_policy(policy)
    K = fb.completions_per_prompt
    s = sample_policy(model, tok, prompts, K, fb.max_new_tokens, fb.temperature, seed=fb.seed + 100 * round_)
    rows = [{"prompt": p, "completions": [{"text": t, "model": policy} for t in s.responses[i * K:(i + 1) * K]]}
            for i, p in enumerate(prompts)]
    rows, left_out = comparable_completions(rows)  # empty or repeated samples: nothing to judge
    write_rows(rows, run.samples(round_))
    project = run.project(round_)
    store = Store(str(run.feedback_db))
    try:
        guidelines = fb.guidelines if fb.task_type == "pairwise" or fb.guidelines != FeedbackSettings.guidelines \
            else THUMBS_GUIDELINES
        store.create_project(project, fb.task_type, overlap_k=fb.overlap_k, guidelines_md=guidelines,
                             settings={"thresholds": threshold_settings(fb)})
        res = store.import_records(project, rows)
    finally:
        store.dispose()
    return {"project": project, "prompts": res.prompts, "completions": res.completions, "items": res.items,
            "policy": policy, "samples_left_out": left_out}


THUMBS_GUIDELINES = "# Is this completion good?\nThumbs up if it answers the prompt well, thumbs down if not."


def thumbs_threshold(cfg: PipelineConfig, run: RunFolder, round_: int, gold_fn) -> float:
    """A thumbs project's bar for the simulated labelers: `feedback.thumbs_threshold`, else the median gold score of
    the round's completions (about half of them deserve a thumbs up)."""
    if cfg.feedback.thumbs_threshold is not None:
        return float(cfg.feedback.thumbs_threshold)
    rows = read_rows(run.samples(round_))
    prompts = [r["prompt"] for r in rows for _ in r["completions"]]
    scores = sorted(float(x) for x in gold_fn(prompts, [c["text"] for r in rows for c in r["completions"]]))
    n = len(scores)
    return (scores[(n - 1) // 2] + scores[n // 2]) / 2 if n else 0.0


def has_judgements(run: RunFolder, round_: int) -> bool:
    """Whether people have judged anything in the round's project (an AI labeler's judgements do not count)."""
    store = Store(str(run.feedback_db))
    try:
        records = store.current_judgements(store.get_project(run.project(round_)).id)
        return any(r.get("labeler_kind", "human") != "ai" for r in records)
    finally:
        store.dispose()


def ai_judge(cfg: PipelineConfig, sft_model: str):
    """The `ai_feedback` section's AI labeler (default: the SFT model), as the judge stage and the evaluation use it."""
    ai = cfg.ai_feedback
    return load_judge(ai.judge or sft_model, ai.constitution, cot=ai.cot, batch_size=ai.batch_size)


def stage_judge(folder: Path, cfg: PipelineConfig, run: RunFolder, round_: int, sft_model: str) -> dict:
    """The AI labeler (the `ai_feedback` section; default the SFT model judging) judges the round's project against
    the constitution, both orders by default; stored as a labeler of kind "ai"."""
    ai = cfg.ai_feedback
    judge = ai_judge(cfg, sft_model)
    store = Store(str(run.feedback_db))
    try:
        return judge_project(store, run.project(round_), judge, both_orders=ai.both_orders, principles=ai.principles,
                             seed=cfg.seed + round_)
    finally:
        store.dispose()


def stage_label(folder: Path, cfg: PipelineConfig, run: RunFolder, round_: int) -> dict:
    """Simulated labelers label the round's project (or people did, in the app; or only the AI labeler judged it);
    labeler quality; the export of unflagged labelers' judgements as preference pairs (a thumbs project: as unpaired
    rows, KTO's data): people's, the AI labeler's (feedback.labelers ai) or both. With an AI labeler, its pairs
    alone are exported too (RL-CAI) and its agreement with the gold scorer and with people is measured."""
    fb = cfg.feedback
    project = run.project(round_)
    kinds = fb.labelers.split("+")
    simulated = "simulated" in kinds
    if simulated and not fb.gold:
        raise ConfigError("feedback.gold (module:function) is required for simulated labelers")
    gold_fn = load_function(fb.gold) if fb.gold else None
    trained_on = "all" if "ai" in kinds and len(kinds) > 1 else "ai" if "ai" in kinds else "human"
    store = Store(str(run.feedback_db), seed=fb.seed + round_ if simulated else None)
    try:
        p = store.get_project(project)
        task = p.task_type
        bar = thumbs_threshold(cfg, run, round_, gold_fn) if simulated and task == "thumbs" else None
        counts = simulate_labeling(store, project, default_labelers(fb.n_careful), gold_fn, seed=fb.seed + round_,
                                   threshold=bar or 0.0) if simulated else None
        every = store.current_judgements(p.id)
        records = [r for r in every if trained_on == "all" or r.get("labeler_kind", "human") == trained_on]
        if not records:
            raise UserError(f"project {project}: no judgements yet. Label in the app "
                            f"(alignloop feedback serve --db {run.feedback_db}) and resume.")
        th = quality.thresholds_from_dict((p.settings or {}).get("thresholds"))
        stats = quality.labeler_stats(records, task)
        flags = quality.flag_labelers(stats, th)
        flagged = {w for w, r in flags.items() if r}
        ann = quality.annotations_from_records(task, records, gold=False)
        rows, summary = export_records(store, project, ExportOptions(
            format="unpaired" if task == "thumbs" else "preference", mode=fb.export_mode, consensus=fb.consensus,
            thresholds=th, exclude_flagged=True, labelers=trained_on))
        ai = ai_label_stats(store, p.id, every, task, gold_fn) if cfg.ai_labels() else None
        if cfg.ai_labels():
            ai_rows, _ = export_records(store, project, ExportOptions(format="preference", mode="all",
                                                                      exclude_flagged=False, labelers="ai"))
            write_rows(ai_rows, run.preferences_ai(round_))
        gold_acc = gold_agreement(every, store, p.id, gold_fn, bar) if gold_fn is not None else None
        agreement = quality.project_agreement(records, task)
    finally:
        store.dispose()
    write_rows(rows, run.preferences(round_))
    loo = [stats[w]["agreement"] for w in stats if w not in flagged and stats[w]["agreement"] is not None]
    info = {"task_type": task, "thumbs_threshold": bar, "judgements": len(records), "per_labeler": counts,
            "stats": stats, "flags": flags, "labelers_trained_on": trained_on,
            "flagged": sorted(flagged), "project_agreement": agreement,
            "pairwise_percent_agreement": percent_agreement(ann, exclude=flagged),
            "mean_loo_agreement_unflagged": mean(loo) if loo else None,
            "gold_agreement": gold_acc, "ai": ai, "export": summary, "preferences": str(run.preferences(round_)),
            "preferences_ai": str(run.preferences_ai(round_)) if cfg.ai_labels() else None}
    run.quality(round_).write_text(json.dumps(info, indent=1, default=str))
    return info


def ai_label_stats(store, project_id: int, records: list[dict], task: str, gold_fn) -> dict:
    """The AI labeler against people (agreement with their majority, κ, position bias: `quality.ai_human_agreement`)
    and, from its first judging order alone vs both orders, against the gold scorer (when known) and the people's
    majority (`ai_agreement_by_order`)."""
    return {"people": quality.ai_human_agreement(records, task),
            "by_order": ai_agreement_by_order(records, store, project_id, gold_fn)}


def percent_agreement(ann: dict, exclude: set) -> float | None:
    """Share of agreeing label pairs over all pairs of labelers on the same item (flagged labelers left out)."""
    kept = {i: {w: v for w, v in labels.items() if w not in exclude} for i, labels in ann.items()}
    return quality.human_pairwise_agreement(kept)["agreement"]


# ------------------------------------------------------------------------------------------------ training
def is_conversational(rows) -> bool:
    """Whether any row is in TRL's conversational format (`messages`, or a prompt / completion / chosen given as a
    list of messages): the labeling app's conversation and chat-prompt exports, given to the pipeline as they are."""
    keys = ("messages", "prompt", "completion", "chosen", "rejected")
    return any(isinstance(r.get(k), list) for r in rows or () if isinstance(r, dict) for k in keys)


def chat_tokenizer(cfg: PipelineConfig, model: str, rows=()):
    """Conversation mode, or conversational rows (an exported conversation set given as `preferences` or SFT rows):
    `model`'s tokenizer with a chat template, its own or the plain one the app generated with (`people.chat_tokenizer`);
    otherwise None (the trainer loads the model's own)."""
    return people.chat_tokenizer(model) if people.conversation_mode(cfg) or is_conversational(rows) else None


def split_by_prompt(rows: list[dict], fraction: float, seed: int,
                    key=None) -> tuple[list[dict], list[dict]]:
    """A deterministic held-out split of preference rows by prompt (about `fraction` of the prompts). `key(prompt)`:
    the string rows are grouped by (default: the whole prompt); all rows of one key fall on the same side."""
    key = key if key is not None else (lambda prompt: json.dumps(prompt, sort_keys=True))
    keys = [key(r["prompt"]) for r in rows]
    prompts = sorted(set(keys))
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:max(1, round(len(prompts) * fraction))])
    if len(held) == len(prompts):
        return rows, []
    train = [r for r, k in zip(rows, keys, strict=True) if k not in held]
    return train, [r for r, k in zip(rows, keys, strict=True) if k in held]


def conversation_key(prompt) -> str:
    """The conversation a preference row's prompt (its context) belongs to: its opening, the messages up to and
    including the first user message (a later turn's context starts with the same opening). A string prompt is its
    own key."""
    if isinstance(prompt, list):
        first_user = next((i for i, m in enumerate(prompt) if isinstance(m, dict) and m.get("role") == "user"),
                          len(prompt) - 1)
        prompt = prompt[:first_user + 1]
    return json.dumps(prompt, sort_keys=True)


def read_preferences(pref_files: list[str]) -> list[dict]:
    """The preference rows of every file (the user's `preferences` and each round's export), read strictly: a
    missing file or a bad row is a DataError naming the file and line."""
    return [dict(r) for f in pref_files for r in read_rows(f)]


def stage_rm(folder: Path, cfg: PipelineConfig, sft_model: str, pref_files: list[str]) -> dict:
    """The reward model on the preferences of every round so far, held out by prompt: no judgement of a held-out
    prompt's pairs (another labeler's, or the reverse order) is trained on. Conversation mode: the pairs are
    conversations (messages), tokenised in the chat format the app generated them in, and held out by conversation
    (`conversation_key`: its opening), so no held-out turn's earlier turns were trained on."""
    rows = read_preferences(pref_files)
    if len(rows) < 4:
        raise UserError(f"only {len(rows)} preference pairs: too few to train a reward model")
    section = dict(cfg.rm)
    section.setdefault("seed", cfg.seed)
    fraction = section.pop("eval_fraction", 0.2)
    eval_rows = None
    if fraction and not section.get("eval_file"):
        rows, eval_rows = split_by_prompt(rows, fraction, section["seed"],
                                          key=conversation_key if people.conversation_mode(cfg) else None)
        write_rows(eval_rows, folder / "heldout_preferences.jsonl")
    args = trainer_config(RewardConfig, section, model=sft_model, output_dir=str(folder), eval_fraction=0.0)
    res = RewardTrainer(model=sft_model, args=args, train_dataset=rows, eval_dataset=eval_rows or None,
                        tokenizer=chat_tokenizer(cfg, sft_model, rows)).train()
    return {"model": res.output_dir, "steps": res.steps, "pairs": len(rows), "heldout_pairs": len(eval_rows or []),
            **res.metrics}


def stage_ppo(folder: Path, cfg: PipelineConfig, policy: str, rm: str, ref: str, train_prompts: list[str]) -> dict:
    """PPO of `policy` against the reward model, with a KL penalty to `ref` (the SFT model). The gold scorer, when
    given, is only watched (`reward/gold_mean`); the update never sees it."""
    section = dict(cfg.ppo or {})
    section.setdefault("seed", cfg.seed)
    args = trainer_config(PPOConfig, section, output_dir=str(folder))
    gold = load_function(cfg.eval.gold) if cfg.eval.gold else None
    ref_model = load_causal_lm(ref) if ref != policy else None
    res = PPOTrainer(model=policy, reward=rm, args=args, train_dataset=train_prompts, gold_reward=gold,
                     ref_model=ref_model).train()
    return {"model": str(folder / "final"), "updates": res.steps, "stop_reason": res.stop_reason,
            **numbers(res.metrics)}


# the online trainers that, like PPO, train the SFT model against the reward model: section -> (config, trainer)
ONLINE = {"rloo": (RLOOConfig, GRPOTrainer), "grpo": (GRPOConfig, GRPOTrainer),
          "online_dpo": (OnlineDPOConfig, OnlineDPOTrainer)}


def stage_online(folder: Path, cfg: PipelineConfig, section_name: str, sft_model: str, rm: str,
                 train_prompts: list[str]) -> dict:
    """RLOO, GRPO or online DPO (`section_name` "rloo" / "grpo" / "online_dpo": its YAML section, config and trainer
    in `ONLINE`) of the SFT model against the reward model, with the KL to the SFT model (the trainer's frozen copy
    of its starting policy). As in PPO the gold scorer, when given, is only watched (`reward/gold_mean`)."""
    config_cls, trainer_cls = ONLINE[section_name]
    section = dict(getattr(cfg, section_name) or {})
    section.setdefault("seed", cfg.seed)
    args = trainer_config(config_cls, section, output_dir=str(folder))
    gold = load_function(cfg.eval.gold) if cfg.eval.gold else None
    res = trainer_cls(model=sft_model, reward=rm, args=args, train_dataset=train_prompts, gold_reward=gold).train()
    return {"model": str(folder / "final"), "updates": res.steps, "stop_reason": res.stop_reason,
            "estimator": getattr(args, "estimator", section_name), **numbers(res.metrics)}


def stage_cai(folder: Path, cfg: PipelineConfig, sft_model: str, train_prompts: list[str]) -> dict:
    """SL-CAI: the SFT model answers the training prompts, critiques and revises its answers against the constitution
    (`ai_feedback.cai`: CAIConfig fields; the critic is the policy itself unless `critic_model` is given), and is
    fine-tuned on the revisions (`sft` on unless the section turns it off)."""
    ai = cfg.ai_feedback
    section = {"seed": cfg.seed, "sft": True, **(ai.cai or {})}
    if ai.constitution and "constitution" not in section:
        section["constitution"] = ai.constitution
    args = trainer_config(CAIConfig, section, model=sft_model, output_dir=str(folder))
    res = ConstitutionalAI(model=sft_model, args=args, train_dataset=train_prompts).run()
    return {"model": res.sft_model or sft_model, "examples": res.examples, "written": res.written,
            "empty_revisions": res.empty_revisions, "chains": res.chains_file, "revisions": res.revisions_file,
            **numbers(res.summary)}


def stage_rl_cai(folder: Path, cfg: PipelineConfig, start: str, rm_ai: str, train_prompts: list[str]) -> dict:
    """RL-CAI: `ai_feedback.rl` (ppo / rloo / grpo, with that trainer's pipeline section) of `start` (the SFT or
    SL-CAI model, also the KL reference) against the reward model trained on the AI labels."""
    name = cfg.ai_feedback.rl
    if name == "ppo":
        return stage_ppo(folder, cfg, start, rm_ai, start, train_prompts)
    return stage_online(folder, cfg, name, start, rm_ai, train_prompts)


def stage_dpo(folder: Path, cfg: PipelineConfig, sft_model: str, pref_files: list[str]) -> dict:
    rows = read_preferences(pref_files)
    section = dict(cfg.dpo or {})
    section.setdefault("seed", cfg.seed)
    section.setdefault("ref_cache_dir", "none")
    args = trainer_config(DPOConfig, section, output_dir=str(folder))
    res = DPOTrainer(model=sft_model, args=args, train_dataset=rows,
                     tokenizer=chat_tokenizer(cfg, sft_model, rows)).train()
    return {"model": str(res.output_dir), "steps": res.steps, "pairs": len(rows), **numbers(res.metrics)}


def unpaired_rows(files: list[str]) -> list[dict]:
    """The rows of every file as unpaired {prompt, completion, label} rows: thumbs exports as they are, preference
    pairs (the pairwise rounds' exports, the user's preferences) unpaired as TRL does (`groups_to_unpaired`). Read
    strictly: a missing file or a bad row is a DataError naming the file and line."""
    rows: list[dict] = []
    for f in files:
        records, stats = load_records(f)
        rows += groups_to_unpaired(records) if stats.kind in ("preference", "ranking") else \
            [{k: r[k] for k in ("prompt", "completion", "label")} for r in records]
    return rows


def stage_kto(folder: Path, cfg: PipelineConfig, sft_model: str, files: list[str]) -> dict:
    """KTO of the SFT model on the thumbs of every round (or the preferences, unpaired)."""
    rows = unpaired_rows(files)
    if len(rows) < 2:
        raise UserError(f"only {len(rows)} labelled completions: too few to train KTO")
    section = dict(cfg.kto or {})
    section.setdefault("seed", cfg.seed)
    args = trainer_config(KTOConfig, section, output_dir=str(folder))
    res = KTOTrainer(model=sft_model, args=args, train_dataset=rows,
                     tokenizer=chat_tokenizer(cfg, sft_model, rows)).train()
    return {"model": str(res.output_dir), "steps": res.steps, "desirable": sum(bool(r["label"]) for r in rows),
            "undesirable": sum(not r["label"] for r in rows), **numbers(res.metrics)}


def stage_rs(folder: Path, cfg: PipelineConfig, sft_model: str, rm: str, train_prompts: list[str]) -> dict:
    section = dict(cfg.rejection_sampling or {})
    section.setdefault("seed", cfg.seed)
    args = trainer_config(RSConfig, section, model=sft_model, reward_model=rm, output_dir=str(folder))
    res = RejectionSamplingTrainer(model=sft_model, args=args, train_dataset=train_prompts, reward_model=rm).train()
    return {"model": res.output_dir, "rounds": res.steps, **numbers(res.metrics)}


# ------------------------------------------------------------------------------------------------ evaluation
def stage_eval(folder: Path, cfg: PipelineConfig, run: RunFolder, policies: dict[str, str], sft: str,
               rm: str | None, prompts: list[str]) -> dict:
    ev = cfg.eval
    n = ev.samples_per_prompt
    gold = load_function(ev.gold) if ev.gold else None
    scorer = load_scorer(rm, batch_size=64) if rm else None
    sft_model, sft_tok = load_policy(sft)
    # independent SFT samples: the reference every win rate is computed against
    reference = score(sample_policy(sft_model, sft_tok, prompts, n, ev.max_new_tokens, ev.temperature,
                                    seed=ev.seed), scorer, gold)
    write_rows(reference.to_rows(), run.eval_samples("reference"))
    summary: dict[str, dict] = {}
    samples: dict[str, list[dict]] = {}
    bon: dict[str, dict] = {}
    big_n = max(ev.best_of_n) if ev.best_of_n and scorer is not None else n
    # SFT candidates (the first of each prompt is the SFT row; all of them feed best-of-N)
    cand = score(sample_policy(sft_model, sft_tok, prompts, big_n, ev.max_new_tokens, ev.temperature,
                               seed=ev.seed + 1, ref_model=sft_model), scorer, gold)
    sft_s = first_of_each(cand, big_n)
    summary["SFT"] = summarize(sft_s, reference)
    samples["SFT"] = sft_s.to_rows()
    if scorer is not None and ev.best_of_n:   # eval.best_of_n empty: no best-of-N
        for N in ev.best_of_n:
            s = best_of_n(cand, big_n, N, key="rm")
            bon[str(N)] = summarize(s, reference)
            samples[f"best-of-{N}"] = s.to_rows()
        summary[f"best-of-{max(ev.best_of_n)}"] = bon[str(max(ev.best_of_n))]
    for name, path in policies.items():
        if name == "SFT":
            continue
        model, tok = load_policy(path)
        s = score(sample_policy(model, tok, prompts, n, ev.max_new_tokens, ev.temperature, seed=ev.seed + 2,
                                ref_model=sft_model), scorer, gold)
        summary[name] = summarize(s, reference)
        samples[name] = s.to_rows()
        del model
    if cfg.ai_feedback is not None:   # the AI labeler's win rates too (`alignloop eval --judge`)
        ai = cfg.ai_feedback
        judge = ai_judge(cfg, sft)
        for name in summary:
            rows = samples[name]
            wins = ai_win_rate(judge, [r["prompt"] for r in rows], [r["response"] for r in rows], reference.responses,
                               both_orders=ai.both_orders, principles=ai.principles, seed=ev.seed)
            summary[name].update({k: v for k, v in wins.items() if k != "ai/judge"})
    for name, rows in samples.items():
        write_rows(rows, run.eval_samples(name))
    results = {"summary": summary, "best_of_n": bon, "policies": policies, "reference": sft, "reward_model": rm,
               "gold": ev.gold, "prompts": len(prompts), "samples_per_prompt": n}
    run.results_file.write_text(json.dumps(results, indent=1))
    return results
