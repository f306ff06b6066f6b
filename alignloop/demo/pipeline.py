"""The whole loop as resumable stages in one run folder: SFT -> sample -> label -> reward model -> PPO (rounds), then
DPO, best-of-N, rejection sampling, evaluation and the report.

    cfg = PipelineConfig.from_yaml("pipeline.yaml")      # or PipelineConfig(policy=..., prompts=..., ...)
    run_pipeline(cfg)                                    # `alignloop pipeline pipeline.yaml`

Every stage writes into its own folder of `output_dir` and ends by writing `STAGE_DONE.json` (its outputs and wall
time); a stage whose marker exists is skipped, so running the same command again resumes after the last finished
stage. `stages.json` in the run folder lists the wall time of every stage. Several `rounds` repeat
collect -> label -> reward model -> PPO, each round sampling from the previous round's PPO policy and training the
reward model on the preferences of all rounds so far (InstructGPT's loop).

Run folder:
    sft/final                         the SFT model (skipped when `sft` is not given: `policy` is the SFT model)
    feedback.db                       the feedback store (one project per round: round-1, round-2, ...)
    round-N/sample/samples.jsonl      completions imported into the store
    round-N/label/                    quality.json (labeler statistics, flags, agreement), preferences.jsonl
    round-N/rm/final, round-N/ppo/final
    dpo/, best_of_n/, rs/, eval/results.json, report.md, report.html, plots/*.png
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alignloop.errors import ConfigError, UserError

log = logging.getLogger("alignloop.pipeline")
logging.getLogger("alembic").setLevel(logging.WARNING)
DONE = "STAGE_DONE.json"


def _f(default, help: str):
    """A config field with its help text (factories for mutable defaults)."""
    if isinstance(default, (list, dict)) or callable(default):
        value = default
        return field(default_factory=value if callable(value) else (lambda: type(value)(value)),
                     metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class FeedbackSettings:
    """How completions are collected and labeled each round (the `feedback:` section)."""
    num_prompts: int = _f(64, "Prompts sampled for labeling per round.")
    completions_per_prompt: int = _f(4, "K completions per prompt; each prompt gives K(K-1)/2 pairwise items.")
    max_new_tokens: int = _f(48, "Maximum tokens per sampled completion.")
    temperature: float = _f(1.0, "Sampling temperature.")
    labelers: str = _f("simulated", "simulated (judges of `gold`) or human (people label in the app; the run "
                                    "stops after sampling until they have).")
    n_careful: int = _f(4, "Simulated: careful Bradley-Terry judges (plus one careless, position-biased one).")
    overlap_k: int = _f(3, "Distinct labelers per item.")
    gold: str | None = _f(None, "Simulated: the hidden scorer module:function, f(prompts, responses) -> scores.")
    guidelines: str = _f("# Which completion is better?\nPick the completion that answers the prompt better.",
                         "Markdown guidelines shown to labelers.")
    thresholds: dict | None = _f(None, "Labeler-quality thresholds (fields of alignloop.feedback.quality."
                                       "Thresholds); flagged labelers are left out of the export.")
    export_mode: str = _f("all", "Export every judgement of unflagged labelers (all) or one consensus label "
                                 "per item (consensus).")
    consensus: str = _f("majority", "Consensus method: majority or dawid_skene.")
    seed: int = _f(0, "Seed of prompt choice, sampling and simulated labelers.")


@dataclass
class EvalSettings:
    """The evaluation stage (the `eval:` section)."""
    num_prompts: int = _f(64, "Held-out prompts evaluated.")
    samples_per_prompt: int = _f(1, "Samples per prompt and policy.")
    max_new_tokens: int = _f(48, "Maximum tokens per sample.")
    temperature: float = _f(1.0, "Sampling temperature.")
    gold: str | None = _f(None, "A held-out scorer module:function (never trained on); else only the reward "
                                "model judges.")
    best_of_n: list[int] = _f([1, 2, 4, 8, 16], "N values of best-of-N from the SFT model (empty: none).")
    seed: int = _f(1234, "Sampling seed.")


@dataclass
class PipelineConfig:
    """`alignloop pipeline config.yaml`: the fields of the file (see examples/pipeline.yaml)."""
    output_dir: str = _f("runs/pipeline", "The run folder: every artifact goes here.")
    policy: str = _f("", "Starting model: hub id or local folder.")
    sft: dict | None = _f(None, "SFTConfig fields (train_file required); leave out when `policy` is already SFT.")
    prompts: str | list | None = _f(None, "Prompt file ({prompt} rows) or a list of strings.")
    eval_prompts: str | list | None = _f(None, "Held-out prompts; default: the last eval.num_prompts of `prompts`.")
    preferences: str | None = _f(None, "Existing preference data ({prompt, chosen, rejected}); round 1 uses it "
                                       "instead of collecting.")
    feedback: FeedbackSettings = _f(FeedbackSettings, "Collection and labeling.")
    rm: dict = _f({}, "RewardConfig fields (alignloop rm --help).")
    ppo: dict | None = _f({}, "PPOConfig fields (alignloop ppo --help); null skips PPO.")
    dpo: dict | None = _f({}, "DPOConfig fields (alignloop dpo --help); null skips DPO.")
    rejection_sampling: dict | None = _f({}, "RSConfig fields (alignloop rs --help); null skips it.")
    eval: EvalSettings = _f(EvalSettings, "Evaluation.")
    rounds: int = _f(1, "Rounds of collect -> reward model -> PPO, each sampling from the last PPO policy.")
    seed: int = _f(0, "Seed of every stage.")
    human_stop: bool = _f(False, "Stop after sampling so people can label (implied by feedback.labelers human).")

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> PipelineConfig:
        d = dict(d or {})
        known = {f for f in cls.__dataclass_fields__}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(bad)}; expected {', '.join(sorted(known))}")
        for name, sub in (("feedback", FeedbackSettings), ("eval", EvalSettings)):
            v = d.get(name)
            if isinstance(v, dict):
                bad = sorted(set(v) - set(sub.__dataclass_fields__))
                if bad:
                    raise ConfigError(f"{where}: {name}: unknown field(s) {', '.join(bad)}")
                d[name] = sub(**v)
        cfg = cls(**d)
        if not cfg.policy:
            raise ConfigError(f"{where}: 'policy' (the starting model, hub id or local folder) is required")
        if cfg.prompts is None:
            raise ConfigError(f"{where}: 'prompts' (a JSONL/JSON file of prompts or a list) is required")
        if cfg.rounds < 1:
            raise ConfigError(f"{where}: rounds must be >= 1")
        if cfg.sft is not None and not cfg.sft.get("train_file") and not cfg.sft.get("train_rows"):
            raise ConfigError(f"{where}: sft.train_file is required when an sft section is given")
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        from alignloop.training.config import read_yaml

        p = Path(path)
        d = read_yaml(p)  # missing file, bad YAML, non-mapping: ConfigError naming the file
        # relative paths in the file are relative to the file
        base = p.parent
        for key in ("policy", "prompts", "eval_prompts", "preferences"):
            v = d.get(key)
            if isinstance(v, str) and (base / v).exists() and not Path(v).is_absolute():
                d[key] = str(base / v)
        if isinstance(d.get("sft"), dict) and isinstance(d["sft"].get("train_file"), str):
            tf = d["sft"]["train_file"]
            if (base / tf).exists() and not Path(tf).is_absolute():
                d["sft"]["train_file"] = str(base / tf)
        return cls.from_dict(d, str(path))


# ------------------------------------------------------------------------------------------------ run folder
class RunFolder:
    """Stage markers and wall times. `stage(name, fn)` runs fn(folder) unless its marker exists."""

    def __init__(self, root: str | Path, echo: Callable[[str], None] = print):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.echo = echo

    def path(self, name: str) -> Path:
        return self.root / name

    def done(self, name: str) -> bool:
        return (self.root / name / DONE).exists()

    def info(self, name: str) -> dict:
        return json.loads((self.root / name / DONE).read_text())

    def stage(self, name: str, fn: Callable[[Path], dict]) -> dict:
        folder = self.root / name
        if self.done(name):
            info = self.info(name)
            self.echo(f"[{name}] done already ({info.get('seconds', 0):.0f}s): skipped")
            return info
        folder.mkdir(parents=True, exist_ok=True)
        self.echo(f"[{name}] ...")
        t0 = time.perf_counter()
        info = fn(folder) or {}
        info["seconds"] = time.perf_counter() - t0
        (folder / DONE).write_text(json.dumps(info, indent=1, default=str))
        times = self.timings()
        times[name] = info["seconds"]
        (self.root / "stages.json").write_text(json.dumps(times, indent=1))
        self.echo(f"[{name}] finished in {info['seconds']:.1f}s")
        return info

    def timings(self) -> dict[str, float]:
        p = self.root / "stages.json"
        return json.loads(p.read_text()) if p.exists() else {}


# ------------------------------------------------------------------------------------------------ helpers
def read_prompts(source: str | list | None) -> list[str]:
    if source is None:
        return []
    if isinstance(source, list):
        rows = source
    else:
        from alignloop.data import load_prompts

        try:
            records, _ = load_prompts(source)
            rows = [r["prompt"] if isinstance(r, dict) else getattr(r, "prompt", r) for r in records]
        except Exception as e:  # noqa: BLE001 - fall back to a plain reader with a clear error
            rows = _read_jsonl_prompts(source, e)
    out = []
    for i, r in enumerate(rows):
        p = r.get("prompt") if isinstance(r, dict) else r
        if not isinstance(p, str) or not p:
            raise UserError(f"prompts row {i + 1}: expected a non-empty prompt string")
        out.append(p)
    return out


def _read_jsonl_prompts(path: str, err: Exception) -> list:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such prompt file") from None
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: not JSON ({err})") from None
    return rows


def write_jsonl(rows, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _config(cls, overrides: dict | None, **fixed):
    """A trainer config from its dataclass defaults, the YAML section, then the pipeline's fixed fields."""
    vals = dict(overrides or {})
    vals.update(fixed)
    known = set(cls.__dataclass_fields__)
    bad = sorted(set(vals) - known)
    if bad:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(bad)}")
    return cls(**vals)


def _threshold_settings(fb: FeedbackSettings) -> dict:
    """Quality thresholds stored with the project (the app's dashboard and the export use the same ones).
    Simulated labelers answer instantly: the time-per-item test is for people only."""
    th = dict(fb.thresholds or {})
    if fb.labelers == "simulated":
        th.setdefault("min_median_seconds", 0.0)
    return th


# ------------------------------------------------------------------------------------------------ stages
class Pipeline:
    def __init__(self, cfg: PipelineConfig, echo: Callable[[str], None] = print):
        self.cfg = cfg
        self.run = RunFolder(cfg.output_dir, echo)
        self.echo = echo
        self.notes: list[str] = []
        self.all_prompts = read_prompts(cfg.prompts)
        if cfg.eval_prompts is not None:
            self.eval_prompts = read_prompts(cfg.eval_prompts)
            self.train_prompts = self.all_prompts
        else:
            k = min(cfg.eval.num_prompts, max(1, len(self.all_prompts) // 4))
            self.train_prompts, self.eval_prompts = self.all_prompts[:-k], self.all_prompts[-k:]
        self.eval_prompts = self.eval_prompts[:cfg.eval.num_prompts]
        if not self.train_prompts:
            raise UserError("no training prompts")

    # -- SFT
    def sft_model(self) -> str:
        if self.cfg.sft is None:
            return self.cfg.policy
        return str(self.run.path("sft") / "final")

    def stage_sft(self, folder: Path) -> dict:
        from alignloop.trainers.sft import SFTConfig, SFTTrainer

        section = dict(self.cfg.sft)
        rows = section.pop("train_rows", None)
        args = _config(SFTConfig, section, model=self.cfg.policy, output_dir=str(folder))
        res = SFTTrainer(model=self.cfg.policy, args=args, train_dataset=rows).train()
        return {"model": res.output_dir, "steps": res.steps, **res.metrics}

    # -- collect
    def stage_sample(self, folder: Path, round_: int, policy: str) -> dict:
        from alignloop.evaluation import load_policy, sample_policy
        from alignloop.feedback.store import Store

        fb = self.cfg.feedback
        rng = random.Random(fb.seed + round_)
        prompts = list(self.train_prompts)
        rng.shuffle(prompts)
        prompts = prompts[:fb.num_prompts]
        model, tok = load_policy(policy)
        s = sample_policy(model, tok, prompts, fb.completions_per_prompt, fb.max_new_tokens, fb.temperature,
                          seed=fb.seed + 100 * round_)
        K = fb.completions_per_prompt
        rows = []
        for i, p in enumerate(prompts):
            texts = []
            for t in s.responses[i * K:(i + 1) * K]:
                if t not in texts:   # identical completions make an uninformative pair
                    texts.append(t)
            rows.append({"prompt": p, "completions": [{"text": t, "model": policy} for t in texts]})
        write_jsonl(rows, folder / "samples.jsonl")
        store = Store(str(self.run.root / "feedback.db"))
        try:
            project = f"round-{round_}"
            store.create_project(project, "pairwise", overlap_k=fb.overlap_k, guidelines_md=fb.guidelines,
                                 settings={"thresholds": _threshold_settings(fb)})
            res = store.import_records(project, rows)
        finally:
            store.dispose()
        return {"project": project, "prompts": res.prompts, "completions": res.completions, "items": res.items,
                "policy": policy}

    def stage_label(self, folder: Path, round_: int) -> dict:
        from alignloop.feedback import quality
        from alignloop.feedback.export import ExportOptions, export_records
        from alignloop.feedback.store import Store

        fb = self.cfg.feedback
        project = f"round-{round_}"
        simulated = fb.labelers == "simulated"
        store = Store(str(self.run.root / "feedback.db"), seed=fb.seed + round_ if simulated else None)
        try:
            p = store.get_project(project)
            counts = None
            gold_fn = None
            if simulated:
                from alignloop.scoring import load_function
                from alignloop.demo.labelers import default_labelers, simulate_labeling

                if not fb.gold:
                    raise ConfigError("feedback.gold (module:function) is required for simulated labelers")
                gold_fn = load_function(fb.gold)
                counts = simulate_labeling(store, project, default_labelers(fb.n_careful), gold_fn,
                                           seed=fb.seed + round_)
            records = store.current_judgements(p.id)
            if not records:
                raise UserError(f"project {project}: no judgements yet. Label in the app "
                                f"(alignloop feedback serve --db {self.run.root / 'feedback.db'}) and resume.")
            th = quality.thresholds_from_dict((p.settings or {}).get("thresholds"))
            stats = quality.labeler_stats(records, "pairwise")
            flags = quality.flag_labelers(stats, th)
            agreement = quality.project_agreement(records, "pairwise")
            ann = quality.annotations_from_records("pairwise", records, gold=False)
            flagged = {w for w, r in flags.items() if r}
            pct = _percent_agreement(ann, exclude=flagged)
            rows, summary = export_records(store, project, ExportOptions(
                format="preference", mode=fb.export_mode, consensus=fb.consensus, thresholds=th,
                exclude_flagged=True))
            gold_acc = None
            if gold_fn is not None:
                from alignloop.demo.labelers import gold_agreement

                gold_acc = gold_agreement(records, store, p.id, gold_fn)
        finally:
            store.dispose()
        write_jsonl(rows, folder / "preferences.jsonl")
        info = {"judgements": len(records), "per_labeler": counts, "stats": stats, "flags": flags,
                "flagged": sorted(flagged), "project_agreement": agreement,
                "pairwise_percent_agreement": pct,
                "mean_loo_agreement_unflagged": _mean([stats[w]["agreement"] for w in stats
                                                       if w not in flagged and stats[w]["agreement"] is not None]),
                "gold_agreement": gold_acc, "export": summary, "preferences": str(folder / "preferences.jsonl")}
        (folder / "quality.json").write_text(json.dumps(info, indent=1, default=str))
        return info

    # -- reward model
    def stage_rm(self, folder: Path, pref_files: list[str]) -> dict:
        from alignloop.trainers.rm import RewardConfig, RewardTrainer

        rows = [r for f in pref_files for r in read_jsonl(Path(f))]
        if len(rows) < 4:
            raise UserError(f"only {len(rows)} preference pairs: too few to train a reward model")
        section = dict(self.cfg.rm)
        section.setdefault("seed", self.cfg.seed)
        fraction = section.pop("eval_fraction", 0.2)
        eval_rows = None
        if fraction and not section.get("eval_file"):
            # held out by prompt: no judgement of a held-out prompt's pairs (another labeler's, or the reverse
            # order) is trained on
            rows, eval_rows = split_by_prompt(rows, fraction, section["seed"])
            write_jsonl(eval_rows, folder / "heldout_preferences.jsonl")
        args = _config(RewardConfig, section, model=self.sft_model(), output_dir=str(folder), eval_fraction=0.0)
        res = RewardTrainer(model=self.sft_model(), args=args, train_dataset=rows,
                            eval_dataset=eval_rows or None).train()
        return {"model": res.output_dir, "steps": res.steps, "pairs": len(rows),
                "heldout_pairs": len(eval_rows or []), **res.metrics}

    # -- PPO
    def stage_ppo(self, folder: Path, policy: str, rm: str, ref: str) -> dict:
        from alignloop.trainers.ppo import PPOConfig, PPOTrainer

        section = dict(self.cfg.ppo or {})
        section.setdefault("seed", self.cfg.seed)
        args = _config(PPOConfig, section, output_dir=str(folder))
        gold = None
        if self.cfg.eval.gold:  # monitoring only (logged as reward/gold_mean; the update never sees it)
            from alignloop.scoring import load_function
            gold = load_function(self.cfg.eval.gold)
        ref_model = None
        if ref != policy:
            from alignloop.models import load_causal_lm
            ref_model = load_causal_lm(ref)
        trainer = PPOTrainer(model=policy, reward=rm, args=args, train_dataset=self.train_prompts,
                             gold_reward=gold, ref_model=ref_model)
        out = trainer.train()
        info = {"model": str(folder / "final"), "updates": trainer.state.get("update")}
        if isinstance(out, dict):
            info.update({k: v for k, v in out.items() if isinstance(v, (int, float, str))})
        return info

    # -- DPO
    def stage_dpo(self, folder: Path, pref_files: list[str]) -> dict:
        from alignloop.trainers.dpo import DPOConfig, DPOTrainer

        rows = [r for f in pref_files for r in read_jsonl(Path(f))]
        section = dict(self.cfg.dpo or {})
        section.setdefault("seed", self.cfg.seed)
        section.setdefault("ref_cache_dir", "none")
        args = _config(DPOConfig, section, output_dir=str(folder))
        res = DPOTrainer(model=self.sft_model(), args=args, train_dataset=rows).train()
        return {"model": str(res.output_dir), "steps": res.steps, "pairs": len(rows),
                **{k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}}

    # -- rejection sampling
    def stage_rs(self, folder: Path, rm: str) -> dict:
        from alignloop.recipes.rejection_sampling import (
            RejectionSamplingTrainer,
            RSConfig,
        )

        section = dict(self.cfg.rejection_sampling or {})
        section.setdefault("seed", self.cfg.seed)
        args = _config(RSConfig, section, model=self.sft_model(), reward_model=rm, output_dir=str(folder))
        summaries = RejectionSamplingTrainer(model=self.sft_model(), args=args, train_dataset=self.train_prompts,
                                             reward_model=rm).train()
        last = summaries[-1] if summaries else {}
        return {"model": str(folder / "final"), "rounds": len(summaries),
                **{k: v for k, v in last.items() if isinstance(v, (int, float))}}

    # -- the loop
    def run_all(self) -> dict:
        cfg, run = self.cfg, self.run
        if cfg.sft is not None:
            run.stage("sft", self.stage_sft)
        sft = self.sft_model()
        policy, rm, pref_files = sft, None, []
        for r in range(1, cfg.rounds + 1):
            rd = f"round-{r}"
            if r == 1 and cfg.preferences:
                pref_files.append(cfg.preferences)
            else:
                run.stage(f"{rd}/sample", lambda f, r=r, policy=policy: self.stage_sample(f, r, policy))
                people = cfg.human_stop or cfg.feedback.labelers == "human"
                if people and not run.done(f"{rd}/label") and not self._has_judgements(rd):
                    # people label in the app; running the same command again continues from here
                    return {"stopped": "human", "db": str(run.root / "feedback.db"), "project": rd}
                info = run.stage(f"{rd}/label", lambda f, r=r: self.stage_label(f, r))
                pref_files.append(info["preferences"])
            rm = str(Path(run.stage(f"{rd}/rm", lambda f, files=list(pref_files): self.stage_rm(f, files))["model"]))
            if cfg.ppo is not None and self._available("alignloop.trainers.ppo", "PPO"):
                info = run.stage(f"{rd}/ppo", lambda f, policy=policy, rm=rm: self.stage_ppo(f, policy, rm, sft))
                policy = info["model"]
        policies = {"SFT": sft}
        if cfg.ppo is not None and run.done(f"round-{cfg.rounds}/ppo"):
            policies["PPO"] = policy
        if cfg.dpo is not None and self._available("alignloop.trainers.dpo", "DPO"):
            policies["DPO"] = run.stage("dpo", lambda f: self.stage_dpo(f, pref_files))["model"]
        if cfg.rejection_sampling is not None and self._available("alignloop.recipes.rejection_sampling",
                                                                 "rejection sampling"):
            policies["RS"] = run.stage("rs", lambda f: self.stage_rs(f, rm))["model"]
        from alignloop.demo.stages import stage_eval

        results = run.stage("eval", lambda f: stage_eval(self, f, policies, sft, rm))
        from alignloop.demo.report import write_report

        write_report(self.run.root, notes=self.notes)
        return {"run": str(run.root), "sft": sft, "reward_model": rm, "policies": policies,
                "report": str(run.root / "report.html"), "results": results.get("summary", {}), "notes": self.notes}

    def _has_judgements(self, project: str) -> bool:
        from alignloop.feedback.store import Store

        store = Store(str(self.run.root / "feedback.db"))
        try:
            return bool(store.current_judgements(store.get_project(project).id))
        finally:
            store.dispose()

    def _available(self, module: str, what: str) -> bool:
        import importlib.util

        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            note = f"stage {what} unavailable: module {module} is not installed in this version"
            if note not in self.notes:
                self.notes.append(note)
                self.echo(note)
        return found


def split_by_prompt(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic held-out split of preference rows by prompt (about `fraction` of the prompts)."""
    prompts = sorted({json.dumps(r["prompt"], sort_keys=True) for r in rows})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:max(1, int(round(len(prompts) * fraction)))])
    if len(held) == len(prompts):
        return rows, []
    train = [r for r in rows if json.dumps(r["prompt"], sort_keys=True) not in held]
    return train, [r for r in rows if json.dumps(r["prompt"], sort_keys=True) in held]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _percent_agreement(ann: dict, exclude: set) -> float | None:
    """Share of agreeing label pairs over all pairs of labelers on the same item (flagged labelers left out)."""
    agree = total = 0
    for labels in ann.values():
        vals = [v for w, v in labels.items() if w not in exclude]
        for i in range(len(vals)):
            for j in range(i + 1, len(vals)):
                total += 1
                agree += vals[i] == vals[j]
    return agree / total if total else None


def run_pipeline(cfg: PipelineConfig, echo: Callable[[str], None] = print) -> dict:
    return Pipeline(cfg, echo).run_all()
