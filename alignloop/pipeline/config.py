"""The pipeline's configuration: `alignloop pipeline config.yaml` (see examples/pipeline.yaml).

    cfg = PipelineConfig.from_yaml("pipeline.yaml")      # or PipelineConfig(policy=..., prompts=..., ...)

The sections `sft`, `rm`, `ppo`, `rloo`, `grpo`, `online_dpo`, `dpo`, `kto` and `rejection_sampling` hold the fields
of the trainers' own configs (SFTConfig, RewardConfig, PPOConfig, RLOOConfig, GRPOConfig, OnlineDPOConfig, DPOConfig,
KTOConfig, RSConfig: one vocabulary), checked when their stage builds them. `rloo`, `grpo` (the critic-free trainer of
`alignloop.trainers.grpo`) and `online_dpo` are off unless given: like PPO they train the SFT model against the last
round's reward model, with the KL to the SFT model.

Feedback comes as pairs (`feedback.task_type: pairwise`, the default: reward model, PPO, DPO, rejection sampling) or
as thumbs up / down on single completions (`thumbs`: exported as unpaired rows, which train KTO; the stages that
need pairs are skipped). `feedback.labelers: ai` (or `ai+human`, `ai+simulated`) has an AI labeler judge the pairs
against a constitution (the `ai_feedback:` section); `ai_feedback.cai` and `ai_feedback.rl` add Constitutional AI's
SL-CAI and RL-CAI policies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignloop.errors import ConfigError
from alignloop.training.config import read_yaml


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
    task_type: str = _f("pairwise", "pairwise (which of two completions is better: reward model, PPO, DPO, RS) or "
                                    "thumbs (one completion, up or down: KTO).")
    completions_per_prompt: int = _f(4, "K completions per prompt; each prompt gives K(K-1)/2 pairwise items (thumbs: "
                                        "K items, one per completion).")
    max_new_tokens: int = _f(48, "Maximum tokens per sampled completion.")
    temperature: float = _f(1.0, "Sampling temperature.")
    labelers: str = _f("simulated", "simulated (judges of `gold`), human (people label in the app; the run stops "
                                    "after sampling until they have), ai (an AI labeler judges against the "
                                    "constitution: the `ai_feedback` section), or ai+human / ai+simulated (both, "
                                    "their labels mixed in the export).")
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
    thumbs_threshold: float | None = _f(None, "Simulated thumbs: a careful judge says up with probability "
                                              "σ((gold − threshold)/τ); default: the median gold score of the "
                                              "round's completions.")
    mode: str = _f("pairs", "pairs (each round samples completions into pairwise or thumbs items) or conversation "
                            "(people converse with the round's policy in the app, choosing the better of two "
                            "candidate replies per turn on the 8-point scale; each choice is a preference pair). "
                            "conversation needs people: feedback.labelers human (or --human).")
    max_turns: int = _f(10, "Conversation mode: turns per conversation at most (generation uses max_new_tokens and "
                            "temperature above; the model served is the round's policy).")


MODES = ("pairs", "conversation")


@dataclass
class DemonstrationSettings:
    """People write the responses SFT trains on (the `demonstrations:` section; InstructGPT's step 1): the run starts
    with a demonstration project of the training prompts and stops for people; on resume SFT trains on their
    demonstrations (plus the `sft` section's own train rows, when given; without an `sft` section, SFT's defaults)."""
    num_prompts: int = _f(32, "Training prompts people write demonstrations for.")
    overlap_k: int = _f(1, "Distinct labelers per prompt (each labeler's demonstration is a training row).")
    min_chars: int = _f(20, "Shortest demonstration accepted (characters, after stripping).")
    edit: bool = _f(False, "Sample one answer per prompt from the starting policy (feedback.max_new_tokens and "
                           "temperature) for people to edit (the original kept); else they write from scratch.")
    guidelines: str = _f("# Write the response\nWrite the response the assistant should give to the prompt.",
                         "Markdown guidelines shown to labelers.")
    review: str = _f("not_rejected", "Which demonstrations SFT trains on: not_rejected (all but those an admin "
                                     "rejected) or accepted (only those an admin accepted).")
    seed: int = _f(0, "Seed of the prompt choice and of the sampled answers.")


REVIEWS = ("accepted", "not_rejected")


LABELERS = ("simulated", "human", "ai", "ai+human", "ai+simulated")


@dataclass
class AIFeedbackSettings:
    """AI feedback (the `ai_feedback:` section): the AI labeler, Constitutional AI's supervised stage (SL-CAI) and an
    RL-CAI arm (RLAIF) trained on the AI labels alone, next to the policies trained on people's labels."""
    judge: str | None = _f(None, "The AI labeler: a causal LM (folder or hub id) or module:function; default: the "
                                 "SFT model (the model's own judgements).")
    constitution: str | None = _f(None, "Constitution YAML (principles, their critique/revision requests and "
                                        "comparison questions); default: the built-in one.")
    both_orders: bool = _f(True, "Judge each pair in both orders and average (removes position bias).")
    principles: str = _f("sample", "sample (one principle drawn per pair) or all (every principle, averaged).")
    cot: bool = _f(False, "The judge reasons first (chain-of-thought), then its answer is scored.")
    batch_size: int = _f(16, "Pairs per judge forward.")
    judge_all_rounds: bool = _f(True, "Judge every round's project (else round 1 only).")
    cai: dict | None = _f(None, "CAIConfig fields (alignloop cai --help): SL-CAI, the SFT model critiques and revises "
                                "its own samples and is fine-tuned on the revisions; null skips it.")
    rl: str | None = _f(None, "RL-CAI: ppo, rloo or grpo (that trainer's section settings) against a reward model "
                              "trained on the AI labels only; null skips it.")
    rl_from: str = _f("sft", "The RL-CAI policy's start (and KL reference): sft, or sl_cai (Bai et al.'s order).")


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
    demonstrations: DemonstrationSettings | None = _f(None, "People write demonstrations for SFT before the rounds "
                                                            "(the run stops for them); null: none.")
    preferences: str | None = _f(None, "Existing preference data ({prompt, chosen, rejected}; thumbs projects: "
                                       "unpaired {prompt, completion, label}); round 1 uses it instead of collecting.")
    feedback: FeedbackSettings = _f(FeedbackSettings, "Collection and labeling.")
    rm: dict = _f({}, "RewardConfig fields (alignloop rm --help).")
    ppo: dict | None = _f({}, "PPOConfig fields (alignloop ppo --help); null skips PPO.")
    rloo: dict | None = _f(None, "RLOOConfig fields (alignloop rloo --help): RLOO of the SFT model against the last "
                                 "round's reward model; null (the default) skips it.")
    grpo: dict | None = _f(None, "GRPOConfig fields (alignloop grpo --help): GRPO of the SFT model against the last "
                                 "round's reward model; null (the default) skips it.")
    online_dpo: dict | None = _f(None, "OnlineDPOConfig fields (alignloop online-dpo --help): online DPO of the SFT "
                                       "model, pairs judged by the last round's reward model; null (the default) "
                                       "skips it.")
    dpo: dict | None = _f({}, "DPOConfig fields (alignloop dpo --help); null skips DPO.")
    kto: dict | None = _f(None, "KTOConfig fields (alignloop kto --help): KTO on the thumbs (feedback.task_type "
                                "thumbs: runs even when null) or, when given, on the preferences unpaired.")
    rejection_sampling: dict | None = _f({}, "RSConfig fields (alignloop rs --help); null skips it.")
    ai_feedback: AIFeedbackSettings | None = _f(None, "AI feedback: an AI labeler judges every round beside the "
                                                      "people (trained on when feedback.labelers includes ai), "
                                                      "SL-CAI and RL-CAI; null: none.")
    eval: EvalSettings = _f(EvalSettings, "Evaluation.")
    rounds: int = _f(1, "Rounds of collect -> reward model -> PPO, each sampling from the last PPO policy.")
    seed: int = _f(0, "Seed of every stage.")
    human_stop: bool = _f(False, "Stop after sampling so people can label (implied by feedback.labelers human).")

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> PipelineConfig:
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(bad)}; expected {', '.join(sorted(known))}")
        for name, sub in (("feedback", FeedbackSettings), ("eval", EvalSettings), ("ai_feedback", AIFeedbackSettings),
                          ("demonstrations", DemonstrationSettings)):
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
        if cfg.feedback.labelers not in LABELERS:
            raise ConfigError(f"{where}: feedback.labelers must be one of {', '.join(LABELERS)}, got "
                              f"{cfg.feedback.labelers!r}")
        if "ai" in cfg.feedback.labelers.split("+") and cfg.ai_feedback is None:
            cfg.ai_feedback = AIFeedbackSettings()
        _check_ai(cfg, where)
        if cfg.feedback.task_type not in ("pairwise", "thumbs"):
            raise ConfigError(f"{where}: feedback.task_type must be pairwise or thumbs, got {cfg.feedback.task_type!r}")
        for name in ("rloo", "grpo", "online_dpo"):
            if getattr(cfg, name) is not None and not isinstance(getattr(cfg, name), dict):
                raise ConfigError(f"{where}: {name} must be a mapping of the trainer's config fields or null, got "
                                  f"{getattr(cfg, name)!r}")
        if cfg.rounds < 1:
            raise ConfigError(f"{where}: rounds must be >= 1")
        if cfg.sft is not None and not cfg.sft.get("train_file") and not cfg.sft.get("train_rows") \
                and cfg.demonstrations is None:
            raise ConfigError(f"{where}: sft.train_file is required when an sft section is given (or a "
                              f"demonstrations section, whose demonstrations SFT trains on)")
        check_people(cfg, where)
        return cfg

    def ai_labels(self) -> bool:
        """Whether an AI labeler judges each round: when the `ai_feedback` section is given (its labels stored
        beside people's and measured against them; trained on when feedback.labelers includes ai, and by RL-CAI)."""
        return self.ai_feedback is not None

    @classmethod
    def from_yaml(cls, path: str | Path, human: bool = False) -> PipelineConfig:
        """The file's config; `human` (the CLI's --human) makes people the labelers before the checks, so a
        conversation-mode file without `feedback.labelers: human` runs with it."""
        p = Path(path)
        d = read_yaml(p)  # missing file, bad YAML, non-mapping: ConfigError naming the file
        if human:
            d["human_stop"] = True
            if isinstance(d.get("feedback"), dict) or d.get("feedback") is None:
                d["feedback"] = {**(d.get("feedback") or {}), "labelers": "human"}
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


def _check_ai(cfg: PipelineConfig, where: str) -> None:
    ai = cfg.ai_feedback
    if ai is None:
        return
    if ai.principles not in ("sample", "all"):
        raise ConfigError(f"{where}: ai_feedback.principles must be sample or all, got {ai.principles!r}")
    if ai.rl not in (None, "ppo", "rloo", "grpo"):
        raise ConfigError(f"{where}: ai_feedback.rl must be ppo, rloo, grpo or null, got {ai.rl!r}")
    if ai.rl_from not in ("sft", "sl_cai"):
        raise ConfigError(f"{where}: ai_feedback.rl_from must be sft or sl_cai, got {ai.rl_from!r}")
    if ai.rl_from == "sl_cai" and ai.rl is not None and ai.cai is None:
        raise ConfigError(f"{where}: ai_feedback.rl_from sl_cai needs an ai_feedback.cai section (the SL-CAI stage)")
    if ai.cai is not None and not isinstance(ai.cai, dict):
        raise ConfigError(f"{where}: ai_feedback.cai must be a mapping of CAIConfig fields or null")
    if cfg.feedback.task_type == "thumbs":
        raise ConfigError(f"{where}: the AI labeler judges pairs; feedback.task_type thumbs cannot use it")


def check_people(cfg: PipelineConfig, where: str = "config") -> None:
    """The feedback mode and the demonstrations section: what people do in the app, checked before any work."""
    fb, demo = cfg.feedback, cfg.demonstrations
    if fb.mode not in MODES:
        raise ConfigError(f"{where}: feedback.mode must be pairs or conversation, got {fb.mode!r}")
    if fb.mode == "conversation":
        if fb.labelers != "human" and not (cfg.human_stop and fb.labelers == "simulated"):
            raise ConfigError(f"{where}: feedback.mode conversation needs people (they converse with the policy in "
                              f"the app; simulated and AI labelers cannot): set feedback.labelers to human, got "
                              f"{fb.labelers!r}")
        if fb.task_type != "pairwise":
            raise ConfigError(f"{where}: feedback.mode conversation compares two replies per turn; feedback.task_type "
                              f"must be pairwise, got {fb.task_type!r}")
        if cfg.ai_feedback is not None:
            raise ConfigError(f"{where}: the ai_feedback section judges pairwise items; feedback.mode conversation "
                              f"has none (leave ai_feedback out)")
        if not 1 <= fb.max_turns <= 100:
            raise ConfigError(f"{where}: feedback.max_turns must be 1..100, got {fb.max_turns!r}")
        _check_app_settings(where, "feedback.", "conversation",
                            {"generation": {"max_new_tokens": fb.max_new_tokens, "temperature": fb.temperature}},
                            prefix="settings.generation.")
    if demo is None:
        return
    for name in ("num_prompts", "overlap_k", "min_chars"):
        v = getattr(demo, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: demonstrations.{name} must be an integer >= 1, got {v!r}")
    if demo.review not in REVIEWS:
        raise ConfigError(f"{where}: demonstrations.review must be accepted or not_rejected, got {demo.review!r}")
    if not isinstance(demo.edit, bool):
        raise ConfigError(f"{where}: demonstrations.edit must be true or false, got {demo.edit!r}")
    _check_app_settings(where, "demonstrations.", "demonstration", {"min_chars": demo.min_chars},
                        prefix="settings.")


def _check_app_settings(where: str, section: str, task_type: str, settings: dict, prefix: str) -> None:
    """The settings the run will give the app's project, checked now by the app's own rules (before any stage runs,
    not when the project is made after SFT), the error naming the pipeline's field (`section` + name)."""
    from alignloop.errors import UserError  # noqa: PLC0415 - the app's settings module only when people label
    from alignloop.feedback.projects import check_settings  # noqa: PLC0415 - same

    try:
        check_settings(task_type, settings)
    except UserError as e:
        text = str(e)
        text = section + text[len(prefix):] if text.startswith(prefix) else text
        raise ConfigError(f"{where}: {text}") from e
