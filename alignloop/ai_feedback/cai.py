"""The supervised stage of Constitutional AI (Bai et al. 2022, §3): sample a response to each prompt from the policy,
then for `rounds` rounds have a model (the policy itself by default, or `critic_model`) critique the response
against a principle drawn at random from the constitution and revise it; the last revision is SFT data.

A recipe, not a training loop of its own: it composes the shared verbs (`alignloop.data.prompt_texts`,
`alignloop.rollout.sample_completions`, `alignloop.data.write_rows`, the constitution's prompts) and, with `sft`,
the SFT trainer.

    ConstitutionalAI(model="runs/sft/final", args=CAIConfig(output_dir="runs/cai", rounds=2),
                     train_dataset="prompts.jsonl").run()           # -> CAIResult
    alignloop cai --model runs/sft/final --train-file prompts.jsonl --rounds 2 --output-dir runs/cai [--sft]

Each round, every example draws its own principle (`random.Random(seed)`, examples in order within a round), and
generation is batched over all examples of the round (`batch_size` sequences per call): first the critiques
(`constitution.critique_prompt(prompt, response, principle, tokenizer)`), then the revisions (`revision_prompt`).
A model without a chat template sees the constitution's plain-text templates; its turn ends at the first blank line
("\\n\\n", where its format's next turn would begin): generation stops there and the text is cut at it (the
policy's first response too). A chat model sees conversations and stops at EOS. A revision that comes out empty
keeps the previous response (counted as `empty_revisions`); otherwise it becomes the response the next round
critiques. A prompt is one user turn: conversational prompts are rendered with the policy's chat template first
(`prompt_texts`), and that text is what the critic's conversation embeds.

OUTPUT_DIR/revisions.jsonl   SFT rows {"prompt", "completion", "add_eos"}: the final response of each example (the
                             completion reads on from the prompt: a plain-text prompt not ending in whitespace gets
                             a leading space, as the demo data; `add_eos` is false for a response cut at its token
                             limit). An example whose final response is empty is left out (`dropped_empty`).
OUTPUT_DIR/chains.jsonl      per example {"prompt", "initial", "chain": [{"round", "principle", "critique",
                             "revision"}], "final"}: the whole critique/revision chain, for inspection (a
                             plain-text critique as it went into the revision prompt, leading space kept; "" as
                             the revision: it came out empty, the previous response was kept)
OUTPUT_DIR/summary.json      counts, empty critiques/revisions, mean lengths (characters), seconds
OUTPUT_DIR/config.yaml       the resolved config
OUTPUT_DIR/sft/              with `sft`: the SFT run of `model` on revisions.jsonl (final model: sft/final)
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from alignloop.ai_feedback.constitution import Constitution, Principle, load_constitution
from alignloop.data import prompt_texts, write_rows
from alignloop.errors import ConfigError
from alignloop.models import load_causal_lm, load_tokenizer
from alignloop.rollout import SamplingParams, sample_completions
from alignloop.trainers.sft import SFTConfig, SFTTrainer
from alignloop.training.config import load_config, save_config

BLANK_LINE = "\n\n"
# SFT fields that CAI sets itself (the policy, the revisions, OUTPUT_DIR/sft)
_SFT_OWN = ("model", "train_file", "output_dir")


@dataclass
class CAIConfig:
    """`alignloop cai` settings; every field is a flag (`critique_max_new_tokens` -> `--critique-max-new-tokens`)."""

    model: str = field(default="", metadata={"help": "The policy that answers the prompts (and, without "
                                                     "critic_model, critiques and revises): hub id or local folder."})
    critic_model: str | None = field(default=None, metadata={
        "help": "The model that critiques and revises (hub id or folder); None = the policy itself (Bai et al.)."})
    train_file: str = field(default="", metadata={"help": "Prompts ({prompt} rows, or any data with prompts; "
                                                          "JSONL/JSON/Parquet/CSV, a datasets folder or a hub id)."})
    constitution: str | None = field(default=None, metadata={
        "help": "Constitution YAML file (principles with critique and revision requests); None = the built-in "
                "one (alignloop.ai_feedback.constitution.DEFAULT_CONSTITUTION)."})
    output_dir: str = field(default="runs/cai", metadata={"help": "Where revisions.jsonl, chains.jsonl, "
                                                                  "summary.json (and sft/) go."})
    rounds: int = field(default=1, metadata={"help": "Critique -> revision rounds, each with a freshly drawn "
                                                     "principle; each revises the previous round's revision."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts (None = all)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens of the policy's first response."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the first response "
                                                              "(0 = greedy)."})
    top_k: int = field(default=0, metadata={"help": "Top-k truncation of every generation (0 = none)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass of every generation (1.0 = none)."})
    critique_max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens of a critique."})
    revision_max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens of a revision."})
    critique_temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature of critiques and revisions (Bai et al. sample them; 0 = greedy)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Keep the last N tokens of each prompt "
                                                                          "the policy answers."})
    max_context_length: int | None = field(default=None, metadata={
        "help": "Keep the last N tokens of each critique / revision prompt (None = all that fits: a prompt longer "
                "than the model's positions minus the new tokens keeps its last tokens)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per generation call."})
    seed: int = field(default=0, metadata={"help": "Seed of the principle draws, the sampling and SFT."})
    dtype: str | None = field(default=None, metadata={"help": "Load dtype: float32 (default), bfloat16, auto."})
    sft: bool = field(default=False, metadata={"help": "Fine-tune the policy (model) on revisions.jsonl "
                                                       "afterwards, into OUTPUT_DIR/sft (final model: sft/final)."})
    sft_args: dict[str, Any] | str | None = field(default=None, metadata={
        "help": "SFTConfig fields of that run, a mapping (on the command line a YAML/JSON mapping: "
                "'{learning_rate: 1e-5, num_epochs: 2}'); model, train_file and output_dir are set by cai."})
    progress: bool = field(default=True, metadata={"help": "Show the SFT progress bar."})

    def __post_init__(self):
        for name in ("rounds", "max_new_tokens", "critique_max_new_tokens", "revision_max_new_tokens",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompts", "max_prompt_length", "max_context_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (or unset: all), got {getattr(self, name)}")
        for name in ("temperature", "critique_temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = greedy), got {getattr(self, name)}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        self.sft_args = _sft_args(self.sft_args)
        if self.sft_args:
            self.sft_config(Path(self.output_dir, "sft"))  # a wrong SFT field or value fails here, before any work

    def sft_config(self, output_dir: str | os.PathLike) -> SFTConfig:
        """The SFTConfig of the `sft` run: seed, dtype and progress from here, then `sft_args`."""
        values = {"seed": self.seed, "dtype": self.dtype, "progress": self.progress, **(self.sft_args or {})}
        try:
            return load_config(SFTConfig, None, output_dir=str(output_dir), **values)
        except ConfigError as e:
            raise ConfigError(f"sft_args: {str(e).removeprefix('config: ')}") from None


def _sft_args(value) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):  # a flag's text: a YAML (or JSON) mapping
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"sft_args: not a YAML/JSON mapping ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"sft_args: expected a mapping of SFTConfig field: value, got {value!r}")
    own = sorted(set(value) & set(_SFT_OWN))
    if own:
        raise ConfigError(f"sft_args: {', '.join(own)}: set by cai itself (the policy, the revisions, "
                          f"OUTPUT_DIR/sft)")
    return dict(value)


@dataclass
class CAIResult:
    """What `ConstitutionalAI.run()` returns: the files written and the counts of summary.json."""
    output_dir: str
    revisions_file: str
    chains_file: str
    summary_file: str
    examples: int                 # prompts processed
    written: int                  # rows of revisions.jsonl (examples minus dropped_empty)
    empty_revisions: int          # (example, round) revisions that came out empty (the previous response kept)
    sft_model: str | None         # OUTPUT_DIR/sft/final with `sft`, else None
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def model_positions(model) -> int | None:
    """How many positions the model has (GPT-2's n_positions, others' max_position_embeddings), if it says."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def cut_at_blank_line(text: str) -> str:
    """A plain-text model's turn: the text before its first blank line ("\\n\\n")."""
    return text.split(BLANK_LINE, 1)[0]


def is_chat(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def as_completion(prompt: str, text: str, chat: bool) -> str:
    """A generated turn as the completion of `prompt` (prompt + completion is how the text reads): stripped, with a
    leading space after a plain-text prompt that does not end in whitespace."""
    text = text.strip()
    if text and not chat and prompt and not prompt[-1].isspace():
        return " " + text
    return text


def sampling_params(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    plain: bool) -> SamplingParams:
    """temperature 0 = greedy (top-1); a plain-text model also stops at a blank line."""
    greedy = temperature == 0
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0 if greedy else temperature,
                          top_k=1 if greedy else top_k, top_p=1.0 if greedy else top_p,
                          stop_strings=(BLANK_LINE,) if plain else ())


class ConstitutionalAI:
    """`ConstitutionalAI(model, args, train_dataset=prompts, tokenizer=None, critic_model=None,
    critic_tokenizer=None, constitution=None).run() -> CAIResult`.

    model / critic_model: a path or hub id, or a causal LM (then with its tokenizer); default `args.model` /
    `args.critic_model` (None: the policy critiques and revises itself). train_dataset: prompts (a path, hub id,
    rows or strings; default `args.train_file`). constitution: a `Constitution`, a mapping or a YAML path (default
    `args.constitution`, None = the built-in one). Prompts and the constitution are read before any model."""

    def __init__(self, model: Any = None, args: CAIConfig | None = None, train_dataset: Any = None,
                 tokenizer: Any = None, critic_model: Any = None, critic_tokenizer: Any = None,
                 constitution: str | os.PathLike | dict | Constitution | None = None):
        self.args = a = args if args is not None else CAIConfig()
        self.model_arg = model if model is not None else a.model
        if self.model_arg is None or self.model_arg == "":
            raise ConfigError("model: give the policy (--model)")
        self.constitution = load_constitution(constitution if constitution is not None else a.constitution)
        if isinstance(self.model_arg, (str, os.PathLike)):
            self.tokenizer = tokenizer or load_tokenizer(self.model_arg, padding_side="left")
        elif tokenizer is None:
            raise ConfigError("pass tokenizer=... together with a model object")
        else:
            self.tokenizer = tokenizer
        source = train_dataset if train_dataset is not None else a.train_file
        if source is None or (isinstance(source, str) and not source):
            raise ConfigError("train_file: give the prompts to answer (--train-file)")
        self.prompts = prompt_texts(source, tokenizer=self.tokenizer, max_prompts=a.max_prompts)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self._load(self.model_arg)
        critic = critic_model if critic_model is not None else a.critic_model
        if critic is None or critic == "":
            self.critic, self.critic_tokenizer = self.model, self.tokenizer
        elif isinstance(critic, (str, os.PathLike)):
            self.critic_tokenizer = critic_tokenizer or load_tokenizer(critic, padding_side="left")
            self.critic = self._load(critic)
        elif critic_tokenizer is None:
            raise ConfigError("pass critic_tokenizer=... together with a critic model object")
        else:
            self.critic, self.critic_tokenizer = critic, critic_tokenizer

    def _load(self, model):
        if isinstance(model, (str, os.PathLike)):
            model = load_causal_lm(model, dtype=self.args.dtype)
        return model.to(self.device) if next(model.parameters()).device.type == "cpu" else model

    def _generate(self, model, tokenizer, prompts: list[str], params: SamplingParams, seed: int,
                  max_prompt_length: int | None) -> list[tuple[str, bool]]:
        """(text, stopped) of one completion per prompt, batched; a plain-text model's text cut at a blank line."""
        tokenizer.padding_side = "left"
        room = model_positions(model)
        if room is not None:   # the prompt and its new tokens must fit the model: keep the prompt's last tokens
            room = max(1, room - params.max_new_tokens)
            max_prompt_length = room if max_prompt_length is None else min(max_prompt_length, room)
        groups = sample_completions(model, tokenizer, prompts, 1, params, batch_size=self.args.batch_size,
                                    max_prompt_length=max_prompt_length, seed=seed)
        plain = not is_chat(tokenizer)
        out = []
        for (c,) in groups:
            text = c.text
            if plain and BLANK_LINE in text:
                text, stopped = cut_at_blank_line(text), True
            else:
                stopped = c.stopped
            out.append((text, stopped))
        return out

    def draw_principles(self, rng: random.Random) -> list[Principle]:
        """One principle per example, in example order (one round's draws)."""
        return [self.constitution.sample(rng) for _ in self.prompts]

    def run(self) -> CAIResult:
        a, c = self.args, self.constitution
        out = Path(a.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(a, out / "config.yaml")
        t_start = time.perf_counter()
        chat_policy, chat_critic = is_chat(self.tokenizer), is_chat(self.critic_tokenizer)
        rng = random.Random(a.seed)
        times: dict[str, float] = {"time/sample": 0.0, "time/critique": 0.0, "time/revision": 0.0}

        t0 = time.perf_counter()
        first = self._generate(self.model, self.tokenizer, self.prompts, sampling_params(
            a.max_new_tokens, a.temperature, a.top_k, a.top_p, not chat_policy), a.seed, a.max_prompt_length)
        times["time/sample"] = time.perf_counter() - t0
        responses = [t for t, _ in first]        # the response each round critiques (raw for the first)
        stopped = [s for _, s in first]
        chains: list[list[dict[str, Any]]] = [[] for _ in self.prompts]
        critique_params = sampling_params(a.critique_max_new_tokens, a.critique_temperature, a.top_k, a.top_p,
                                          not chat_critic)
        revision_params = sampling_params(a.revision_max_new_tokens, a.critique_temperature, a.top_k, a.top_p,
                                          not chat_critic)
        per_round: list[dict[str, Any]] = []
        for r in range(a.rounds):
            principles = self.draw_principles(rng)
            t0 = time.perf_counter()
            # a plain-text critique goes on verbatim after "Critique:" in the revision prompt; a chat one is a turn
            critiques = [t if not chat_critic else t.strip() for t, _ in self._generate(
                self.critic, self.critic_tokenizer,
                [c.critique_prompt(p, y, pr, self.critic_tokenizer)
                 for p, y, pr in zip(self.prompts, responses, principles, strict=True)],
                critique_params, a.seed + 1 + 2 * r, a.max_context_length)]
            t1 = time.perf_counter()
            revisions = self._generate(
                self.critic, self.critic_tokenizer,
                [c.revision_prompt(p, y, k, pr, self.critic_tokenizer)
                 for p, y, k, pr in zip(self.prompts, responses, critiques, principles, strict=True)],
                revision_params, a.seed + 2 + 2 * r, a.max_context_length)
            t2 = time.perf_counter()
            times["time/critique"] += t1 - t0
            times["time/revision"] += t2 - t1
            empty = 0
            for i, (pr, k, (rev, rev_stopped)) in enumerate(zip(principles, critiques, revisions, strict=True)):
                rev = as_completion(self.prompts[i], rev, chat_policy)
                chains[i].append({"round": r, "principle": pr.name, "critique": k, "revision": rev})
                if rev:
                    responses[i], stopped[i] = rev, rev_stopped
                else:
                    empty += 1
            per_round.append({"round": r, "empty_critiques": sum(not k.strip() for k in critiques),
                              "empty_revisions": empty, "principles": _counts(pr.name for pr in principles)})

        rows, chain_rows = [], []
        for p, (y0, _), chain, y, s in zip(self.prompts, first, chains, responses, stopped, strict=True):
            chain_rows.append({"prompt": p, "initial": y0, "chain": chain, "final": y})
            if y.strip():
                rows.append({"prompt": p, "completion": y, "add_eos": bool(s)})
        revisions_file = write_rows(rows, out / "revisions.jsonl")
        chains_file = write_rows(chain_rows, out / "chains.jsonl")

        empty_revisions = sum(x["empty_revisions"] for x in per_round)
        summary: dict[str, Any] = {
            "examples": len(self.prompts), "rounds": a.rounds, "written": len(rows),
            "dropped_empty": len(self.prompts) - len(rows),
            "empty_critiques": sum(x["empty_critiques"] for x in per_round), "empty_revisions": empty_revisions,
            "unrevised": sum(all(not step["revision"] for step in ch) for ch in chains),
            "cut_at_max_new_tokens": sum(not s for s in stopped),
            "mean_chars/initial": _mean(len(t) for t, _ in first),
            "mean_chars/critique": _mean(len(step["critique"].strip()) for ch in chains for step in ch),
            "mean_chars/revision": _mean(len(step["revision"]) for ch in chains for step in ch),
            "mean_chars/final": _mean(len(y) for y in responses),
            "critic": "policy" if self.critic is self.model else str(a.critic_model or "model object"),
            "constitution": c.name, "per_round": per_round, **times}

        sft_model = None
        if a.sft:
            if not rows:
                raise ConfigError("sft: every final response is empty; nothing to fine-tune on")
            t0 = time.perf_counter()
            sft_model = self._sft(revisions_file, out / "sft")
            summary["time/sft"] = time.perf_counter() - t0
            summary["sft_model"] = sft_model
        summary["seconds"] = time.perf_counter() - t_start
        summary_file = _write_json(summary, out / "summary.json")
        return CAIResult(output_dir=str(out), revisions_file=str(revisions_file), chains_file=str(chains_file),
                         summary_file=str(summary_file), examples=len(self.prompts), written=len(rows),
                         empty_revisions=empty_revisions, sft_model=sft_model, seconds=summary["seconds"],
                         summary=summary)

    def _sft(self, revisions_file: Path, sft_dir: Path) -> str:
        """SFT of the policy on the revisions: a policy given by path is loaded afresh by the trainer (so LoRA and
        the other sft_args apply); the sampling models are released first."""
        from_path = isinstance(self.model_arg, (str, os.PathLike))
        model = str(self.model_arg) if from_path else self.model
        tokenizer = self.tokenizer
        if from_path:
            self.model = self.critic = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        tokenizer.padding_side = "right"
        result = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=str(revisions_file),
                            args=self.args.sft_config(sft_dir)).train()
        return result.output_dir


def run_cai(config: CAIConfig) -> CAIResult:
    """The `alignloop cai` entry point: runs and prints one JSON line (files, counts, seconds)."""
    result = ConstitutionalAI(args=config).run()
    s = result.summary
    print(json.dumps({"revisions": result.revisions_file, "chains": result.chains_file,
                      "summary": result.summary_file, "examples": result.examples, "written": result.written,
                      "empty_revisions": result.empty_revisions, "unrevised": s["unrevised"],
                      "sft_model": result.sft_model, "seconds": round(result.seconds, 2)}))
    return result


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _counts(names) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return counts


def _write_json(obj: dict, path: Path) -> Path:
    """Written beside its destination and renamed into place (as write_rows does for rows)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
