"""`alignloop demo`: the whole loop on the built-in toy domain (short movie reviews), with no downloads.

Stages (each resumable; the run folder and the loop are `alignloop.pipeline`'s; this module adds the toy domain's
data and base model and the demo's sizes):
  data      generate the pretraining corpus, SFT demonstrations and prompts (`alignloop.demo.domain`)
  base      train a byte-level BPE tokenizer locally and pretrain a small GPT-2 from scratch on the corpus
  sft       supervised fine-tuning on the demonstrations
  round-1/sample   K completions per prompt from the SFT model into the feedback store (`feedback.db`)
  round-1/label    simulated labelers (noisy Bradley-Terry judges of the hidden gold scorer, one careless) label
                   through the store; labeler-quality statistics flag the careless one; consensus export
  round-1/rm       reward model on the exported preferences
  round-1/ppo, rloo, grpo, online_dpo, dpo, rs   PPO, RLOO, GRPO, online DPO (against the reward model), DPO and
                   rejection-sampling fine-tuning, each from the same SFT model
  eval      gold scorer and reward model: mean reward, win rate against SFT, KL to SFT, best-of-N for several N
  report    report.md / report.html with plots in plots/

`--ai-feedback` adds Constitutional AI and RLAIF: the corpus also shows critique -> revision and "which review
follows the principle better? (A) or (B)" documents generated from the hidden rules with noise (`demo.critiques`),
so the base model can critique, revise and judge; it then labels round 1 as an AI labeler (both orders) beside the
simulated people (round-1/judge), SL-CAI fine-tunes the SFT model on the base model's revisions of its samples
(sl_cai), RL-CAI runs PPO against a reward model of the AI labels alone (rl_cai/), and the report compares them
with the policies trained on the people's labels.

`--human` stops after sampling and serves the labeling app; `--resume` continues from the last finished stage.
With `--human`, `--demonstrations` first has people write (edit, here: the base model's sampled review of each
prompt is shown to improve) demonstrations that SFT trains on beside the generated ones, and `--feedback-mode
conversation` has people converse with the SFT model instead of judging pairs: each turn's choice on the 8-point
scale is a preference pair for the reward model. In conversation mode the SFT demonstrations are in the chat format
the app serves the model in (`alignloop.data.chat.PLAIN_CHAT_TEMPLATE`: "User: ...", "Assistant: ..."), so the
model the person talks to has learnt to answer in it.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from alignloop.data import read_rows, write_rows
from alignloop.demo import critiques, domain
from alignloop.errors import UserError
from alignloop.models.tiny import build_tiny_checkpoint
from alignloop.pipeline import (
    AIFeedbackSettings,
    DemonstrationSettings,
    EvalSettings,
    FeedbackSettings,
    Pipeline,
    PipelineConfig,
    RunFolder,
)
from alignloop.trainers.sft import SFTConfig, SFTTrainer
from alignloop.training.loop import set_threads

GOLD = "alignloop.demo.domain:gold_scores"


@dataclass
class DemoSize:
    """Sizes of every stage (the default is the full demo; `quick()` is the reduced one the tests run)."""
    corpus: int = 4000
    demos: int = 1000
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 600
    pretrain_steps: int = 500
    pretrain_batch: int = 32
    sft_steps: int = 150
    label_prompts: int = 160
    completions_per_prompt: int = 4
    n_careful: int = 4
    rm_epochs: int = 10
    ppo_updates: int = 60
    ppo_batch: int = 32
    rl_updates: int = 100       # RLOO, GRPO: updates of rl_prompts prompts x rl_generations completions (online DPO: 2)
    rl_prompts: int = 8
    rl_generations: int = 4
    dpo_epochs: int = 2
    rs_rounds: int = 2
    rs_prompts: int = 192
    eval_prompts: int = 128
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    max_new_tokens: int = 40
    # --ai-feedback: documents that teach the base model to critique, revise and compare (`demo.critiques`), the
    # longer context they need, and the SL-CAI stage's size (RL-CAI uses PPO's sizes)
    critique_docs: int = 1000
    comparison_docs: int = 3000
    ai_pretrain_steps: int = 800
    ai_pretrain_batch: int = 16     # packed rows of ai_max_length tokens (judge 93% on its own samples; 12: 83-91%)
    ai_n_positions: int = 128
    ai_max_length: int = 128
    cai_prompts: int = 192
    # people in the app: prompts to write demonstrations for, conversation openings and turns per conversation
    demonstration_prompts: int = 8
    conversation_openings: int = 8
    max_turns: int = 4

    @classmethod
    def quick(cls) -> DemoSize:
        return cls(corpus=2000, demos=600, n_embd=96, pretrain_steps=250, sft_steps=100, label_prompts=128,
                   ppo_updates=30, ppo_batch=32, rl_updates=30, dpo_epochs=2, rs_rounds=1, rs_prompts=128,
                   eval_prompts=48, best_of_n=[1, 4, 16], critique_docs=600, comparison_docs=1800,
                   ai_pretrain_steps=500, cai_prompts=96)


def demo_config(out: Path, size: DemoSize, seed: int = 0, human: bool = False, rounds: int = 1,
                ai_feedback: bool = False, feedback_mode: str = "pairs",
                demonstrations: bool = False) -> PipelineConfig:
    """The demo's pipeline config. `feedback_mode` conversation and `demonstrations` need people (the run stops for
    them): people converse with the SFT model each round / write demonstrations before SFT."""
    run = RunFolder(out, create=False)
    data = run.data_dir
    conversation = feedback_mode == "conversation"
    cfg = PipelineConfig(
        output_dir=str(out),
        policy=str(run.base_model),
        sft={"train_file": str(data / ("chat_demos.jsonl" if conversation else "demos.jsonl")),
             "max_steps": size.sft_steps, "learning_rate": 1e-3,
             "per_device_batch_size": 32, "warmup_steps": 10, "lr_scheduler": "cosine", "max_length": 96,
             "seed": seed, "progress": False, "tensorboard": False, "logging_steps": 10},
        prompts=str(data / "prompts.jsonl"),
        eval_prompts=str(data / "eval_prompts.jsonl"),
        feedback=FeedbackSettings(num_prompts=size.label_prompts, completions_per_prompt=size.completions_per_prompt,
                                  max_new_tokens=size.max_new_tokens, labelers="human" if human else "simulated",
                                  n_careful=size.n_careful, overlap_k=3, gold=GOLD, seed=seed,
                                  guidelines="# Which review is better?\nPick the review you would rather read: "
                                             "well-formed, and as positive about the film as it honestly can be."),
        # a batch element is a prompt (its ~6 pairs x 3 labelers exported as one group): small batches, more epochs
        rm={"num_epochs": size.rm_epochs, "learning_rate": 5e-4, "per_device_batch_size": 4, "max_length": 96,
            "eval_fraction": 0.2, "warmup_steps": 5, "progress": False, "tensorboard": False, "logging_steps": 5,
            "use_margin": False},
        ppo={"total_updates": size.ppo_updates, "rollout_batch_size": size.ppo_batch, "num_ppo_epochs": 4,
             "num_mini_batches": 2, "learning_rate": 1e-4, "max_new_tokens": size.max_new_tokens, "kl_coef": 0.1,
             "reward_normalization": "fit", "normalization_samples": 64, "sample_every": 10, "progress": False,
             "tensorboard": False, "lr_scheduler": "constant"},
        # critic-free: a prompt's K completions are each other's baseline; K x prompts = PPO's completions per update
        rloo=critic_free_section(size, "rloo"),
        grpo=critic_free_section(size, "grpo"),
        online_dpo=online_dpo_section(size),
        dpo={"beta": 0.1, "num_epochs": size.dpo_epochs, "learning_rate": 1e-4, "per_device_batch_size": 16,
             "max_length": 96, "logging_steps": 5,
             "progress": False, "tensorboard": False, "lr_scheduler": "constant"},
        rejection_sampling={"rounds": size.rs_rounds, "samples_per_prompt": 8, "keep_top_k": 1,
                            "max_new_tokens": size.max_new_tokens, "max_prompts": size.rs_prompts,
                            "batch_size": 16, "sft_learning_rate": 3e-4, "sft_epochs": 3, "sft_batch_size": 16,
                            "sft_max_length": 96, "progress": False},
        eval=EvalSettings(num_prompts=size.eval_prompts, max_new_tokens=size.max_new_tokens, gold=GOLD,
                          best_of_n=list(size.best_of_n)),
        rounds=rounds, seed=seed, human_stop=human)
    if ai_feedback:
        cfg.ai_feedback = ai_feedback_section(run, size)
    if conversation:   # people converse with the round's policy instead of judging sampled pairs
        cfg.feedback.mode, cfg.feedback.labelers = "conversation", "human"
        cfg.feedback.num_prompts, cfg.feedback.max_turns, cfg.feedback.overlap_k = \
            size.conversation_openings, size.max_turns, 1
    if demonstrations:
        cfg.demonstrations = DemonstrationSettings(
            num_prompts=size.demonstration_prompts, overlap_k=1, min_chars=20, edit=True, seed=seed,
            guidelines="# Write the review\nImprove the review shown (or write your own): a well-formed review of "
                       "the film, as positive as it honestly can be. SFT trains on what you write.")
    return cfg


def chat_demos(data: Path) -> Path:
    """The demonstrations as conversations (one user message, the assistant's review), for conversation mode: SFT
    learns to answer in the chat format the app serves the model in. Written once, beside demos.jsonl."""
    path = data / "chat_demos.jsonl"
    if not path.exists():
        write_rows([{"prompt": [{"role": "user", "content": r["prompt"]}],
                     "completion": [{"role": "assistant", "content": r["completion"].strip()}]}
                    for r in read_rows(data / "demos.jsonl")], path)
    return path


def ai_feedback_section(run: RunFolder, size: DemoSize) -> AIFeedbackSettings:
    """The demo's AI feedback: the base model (which saw critiques, revisions and comparisons in pretraining, as
    real models do) is the AI labeler and the critic, with the demo's constitution. SL-CAI: the SFT model's samples
    critiqued and revised once by it, then SFT on the revisions (rejection sampling's SFT settings); RL-CAI: PPO
    (PPO's settings) of the SFT model against a reward model of the AI labels alone."""
    base = str(run.base_model)
    return AIFeedbackSettings(
        judge=base, constitution=str(run.data_dir / "constitution.yaml"), both_orders=True, principles="sample",
        batch_size=32, rl="ppo", rl_from="sft",
        cai={"critic_model": base, "rounds": 1, "max_prompts": size.cai_prompts, "max_new_tokens": size.max_new_tokens,
             "critique_max_new_tokens": 24, "revision_max_new_tokens": size.max_new_tokens, "batch_size": 32,
             "critique_temperature": 1.0, "progress": False,
             "sft_args": {"learning_rate": 3e-4, "num_epochs": 3, "per_device_batch_size": 16, "max_length": 96,
                          "lr_scheduler": "constant", "progress": False, "tensorboard": False, "logging_steps": 5}})


def critic_free_section(size: DemoSize, estimator: str) -> dict:
    """The demo's RLOO / GRPO settings (RLOOConfig / GRPOConfig fields): PPO's reward fitting, learning rate and
    response length; K = 4 completions of 8 prompts per update (PPO's 32 completions), one optimizer step each.
    RLOO keeps its paper's loss (each completion's token log-prob sum × advantage): its gradient is ~length× a token
    mean's, but Adam's step does not scale with it (and it is clipped to norm 1), so PPO's learning rate suits it;
    3e-5 learned too slowly (gold −0.1 → 0.6 in 60 updates). Its KL is in the reward, β = 0.15 (measured: gold 3.17
    at KL 4.7, against 3.06 at 6.4 with PPO's 0.1); GRPO's is a k3 loss term, β = 0.1."""
    return {"total_updates": size.rl_updates, "rollout_batch_size": size.rl_prompts,
            "num_generations": size.rl_generations, "learning_rate": 1e-4, "max_new_tokens": size.max_new_tokens,
            "kl_coef": 0.15 if estimator == "rloo" else 0.1, "reward_normalization": "fit",
            "normalization_samples": 64, "sample_every": 10, "progress": False, "tensorboard": False,
            "lr_scheduler": "constant"}


def online_dpo_section(size: DemoSize) -> dict:
    """The demo's online DPO settings (OnlineDPOConfig fields): two completions per prompt, PPO's completions per
    update; the KL strength is DPO's beta: 0.3 (measured: gold 2.71 at KL 4.1; beta 0.1 drifted to KL 6.1 for gold
    1.5)."""
    return {"total_updates": size.rl_updates, "rollout_batch_size": size.rl_prompts * size.rl_generations // 2,
            "beta": 0.3, "learning_rate": 1e-4, "max_new_tokens": size.max_new_tokens, "reward_normalization": "fit",
            "normalization_samples": 64, "sample_every": 10, "progress": False, "tensorboard": False,
            "lr_scheduler": "constant"}


def stage_data(folder: Path, size: DemoSize, seed: int, ai_feedback: bool = False) -> dict:
    """The corpus, demonstrations and prompts; with AI feedback, the corpus also holds critique -> revision and
    comparison documents (never on an evaluation prompt) and the demo's constitution is written beside."""
    corpus = domain.pretraining_corpus(size.corpus, seed=seed)
    demos = domain.demonstrations(size.demos, seed=seed + 1)
    train, held = domain.prompt_split(seed=seed, n_eval=size.eval_prompts)
    if ai_feedback:
        skill = critiques.critique_documents(size.critique_docs, seed=seed + 2, exclude_prompts=held) + \
            critiques.comparison_documents(size.comparison_docs, seed=seed + 3, exclude_prompts=held)
        corpus += skill
        random.Random(seed).shuffle(corpus)
        (folder / "constitution.yaml").write_text(yaml.safe_dump(critiques.DEMO_CONSTITUTION, sort_keys=False))
    write_rows(corpus, folder / "corpus.jsonl")
    write_rows(demos, folder / "demos.jsonl")
    write_rows([{"prompt": p} for p in train], folder / "prompts.jsonl")
    write_rows([{"prompt": p} for p in held], folder / "eval_prompts.jsonl")
    return {"corpus": len(corpus), "demos": len(demos), "prompts": len(train), "eval_prompts": len(held),
            "critique_docs": size.critique_docs if ai_feedback else 0,
            "comparison_docs": size.comparison_docs if ai_feedback else 0}


def stage_base(folder: Path, data: Path, size: DemoSize, seed: int, ai_feedback: bool = False) -> dict:
    """Tokenizer trained locally + a GPT-2-shaped model pretrained from scratch on the corpus (loss on every
    token), with the SFT trainer on `text` rows. With AI feedback: more steps of packed 128-token rows (measured: the
    judging skill forms at 800 steps of 16 packed rows, not at 500, nor unpacked) and the longer documents."""
    rows = [dict(r) for r in read_rows(data / "corpus.jsonl")]
    init = build_tiny_checkpoint(folder / "init", [r["text"] for r in rows], vocab_size=size.vocab_size, seed=seed,
                                 n_layer=size.n_layer, n_embd=size.n_embd, n_head=size.n_head,
                                 n_positions=size.ai_n_positions if ai_feedback else 128)
    args = SFTConfig(output_dir=str(folder), max_steps=size.ai_pretrain_steps if ai_feedback else size.pretrain_steps,
                     learning_rate=2e-3, warmup_steps=20,
                     per_device_batch_size=size.ai_pretrain_batch if ai_feedback else size.pretrain_batch,
                     lr_scheduler="cosine", max_length=size.ai_max_length if ai_feedback else 96,
                     completion_only_loss=False, packing="on" if ai_feedback else "auto", seed=seed,
                     progress=False, tensorboard=False, logging_steps=25, eval_fraction=0.05)
    res = SFTTrainer(model=str(init), args=args, train_dataset=rows).train()
    return {"model": res.output_dir, "steps": res.steps, **res.metrics}


def run_demo(output_dir: str | Path = "runs/demo", size: DemoSize | None = None, seed: int = 0, human: bool = False,
             resume: bool = False, echo: Callable[[str], None] = print, threads: int | None = None,
             rounds: int = 1, ai_feedback: bool = False, feedback_mode: str = "pairs",
             demonstrations: bool = False) -> dict:
    """Run (or resume) the demo. Returns the summary the CLI prints as JSON. `ai_feedback`: Constitutional AI and
    RLAIF too (the base model learns to critique and compare; SL-CAI and RL-CAI policies; the AI labeler measured
    against the simulated people and the gold scorer). `feedback_mode` conversation / `demonstrations`: people
    converse with the policy / write demonstrations (with `human`)."""
    size = size or DemoSize()
    set_threads(threads)
    out = Path(output_dir)
    run = RunFolder(out, echo)
    state_file = run.demo_state
    if resume and state_file.exists():
        state = json.loads(state_file.read_text())
        size = DemoSize(**state["size"])
        seed = state["seed"]
        human = state.get("human", False)
        rounds = state.get("rounds", rounds)
        ai_feedback = state.get("ai_feedback", False)
        feedback_mode = state.get("feedback_mode", "pairs")
        demonstrations = state.get("demonstrations", False)
    elif state_file.exists() and json.loads(state_file.read_text()).get("ai_feedback", False) != ai_feedback:
        raise UserError(f"{out} holds a demo run {'with' if not ai_feedback else 'without'} --ai-feedback (its base "
                        f"model saw {'other' if not ai_feedback else 'no'} critique and comparison documents); use "
                        f"another --output-dir")
    if (feedback_mode == "conversation" or demonstrations) and not human:
        raise UserError("--feedback-mode conversation and --demonstrations are done by people in the app: add --human")
    state_file.write_text(json.dumps({"size": asdict(size), "seed": seed, "human": human, "rounds": rounds,
                                      "ai_feedback": ai_feedback, "feedback_mode": feedback_mode,
                                      "demonstrations": demonstrations}, indent=1))
    run.stage(run.DATA, lambda f: stage_data(f, size, seed, ai_feedback))
    run.stage(run.BASE, lambda f: stage_base(f, run.data_dir, size, seed, ai_feedback))
    if feedback_mode == "conversation":
        chat_demos(run.data_dir)
    cfg = demo_config(out, size, seed, human=human and not resume, rounds=rounds, ai_feedback=ai_feedback,
                      feedback_mode=feedback_mode, demonstrations=demonstrations)
    if human and resume:
        cfg.feedback.labelers = "human"
    return Pipeline(cfg, echo, run=run).run_all()
