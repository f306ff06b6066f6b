"""People in the loop beyond pairwise labels: demonstrations before SFT, and conversation rounds.

Demonstrations (the `demonstrations:` section, InstructGPT's step 1): `stage_demonstrations` makes a demonstration
project of the training prompts (with one answer sampled from the starting policy per prompt for people to edit,
when `edit`); the run stops for people; on resume `demonstration_rows` exports what they wrote as SFT rows and the
SFT stage trains on them (`stages.stage_sft`).

Conversations (`feedback.mode: conversation`, Anthropic's interface): `stage_converse` makes a round's conversation
project, whose openings are the round's prompts and whose model is the round's policy (the app generates two
candidate replies per turn with it); the run stops for people; on resume `stage_conversation_label` exports one
conversational preference pair per chosen turn (the conversation so far as the prompt, the 8-point choice's strength
as the margin) and counts what people did (conversations, turns, the mean 1-7 rating) for the report.

The chat format: conversations are lists of messages, rendered with the policy tokenizer's chat template, or
`alignloop.data.chat.PLAIN_CHAT_TEMPLATE` when it has none, which is what the app's generation used. So training sees
what labelers saw: `chat_tokenizer` is that tokenizer (the SFT stage saves it with the SFT model, the RM, DPO and KTO
stages tokenise with it) and `chat_prompts` renders the plain training prompts in it (PPO, the online trainers,
rejection sampling and the evaluation sample from those).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from alignloop.data import write_rows
from alignloop.data.chat import ensure_chat_template, render_prompt
from alignloop.errors import UserError
from alignloop.evaluation import load_policy, mean, sample_policy
from alignloop.feedback.conversations import export_conversation_rows
from alignloop.feedback.demonstrations import empty_message, export_demonstration_rows
from alignloop.feedback.store import Store
from alignloop.models import load_tokenizer
from alignloop.pipeline.config import FeedbackSettings, PipelineConfig
from alignloop.pipeline.run_folder import RunFolder

CONVERSATION_GUIDELINES = (
    "# Talk with the assistant\nWrite a message; the assistant offers two replies. Pick the better one on the scale "
    "(keys 1-8: 1 = A is much better ... 8 = B is much better); the conversation continues from it. End the "
    "conversation when you have seen enough and rate it from 1 to 7.")


def conversation_mode(cfg: PipelineConfig) -> bool:
    return cfg.feedback.mode == "conversation"


def chat_tokenizer(model: str, padding_side: str = "right"):
    """`model`'s tokenizer with a chat template: its own, or the plain one the labeling app generated with."""
    return ensure_chat_template(load_tokenizer(model, padding_side=padding_side))


def chat_prompts(model: str, prompts: list[str]) -> list[str]:
    """Plain prompts as the opening user message of a conversation, rendered in `model`'s chat format (ending with
    the generation prompt), so a policy trained on conversations is sampled as the app sampled it."""
    tok = chat_tokenizer(model)
    return [render_prompt([{"role": "user", "content": p}], tok) for p in prompts]


def local_or_hub(model: str) -> str:
    """A local folder as an absolute path (the app may be served from another directory), a hub id as it is."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def pick_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """`n` of the training prompts, in a seeded order (a round's items, the demonstration project's prompts)."""
    out = list(prompts)
    random.Random(seed).shuffle(out)
    return out[:n]


# ------------------------------------------------------------------------------------------------ demonstrations
def stage_demonstrations(folder: Path, cfg: PipelineConfig, run: RunFolder, train_prompts: list[str]) -> dict:
    """The demonstration project: `demonstrations.num_prompts` training prompts, each with one answer sampled from
    the starting policy for people to edit when `demonstrations.edit` (an empty sample: written from scratch)."""
    demo = cfg.demonstrations
    prompts = pick_prompts(train_prompts, demo.num_prompts, demo.seed)
    rows: list[dict] = [{"prompt": p} for p in prompts]
    if demo.edit:
        model, tok = load_policy(cfg.policy)
        s = sample_policy(model, tok, prompts, 1, cfg.feedback.max_new_tokens, cfg.feedback.temperature,
                          seed=demo.seed)
        rows = [{"prompt": p, "completion": t} if t.strip() else {"prompt": p}
                for p, t in zip(prompts, s.responses, strict=True)]
    write_rows(rows, run.demonstration_prompts)
    store = Store(str(run.feedback_db))
    try:
        store.create_project(run.DEMONSTRATIONS, "demonstration", overlap_k=demo.overlap_k,
                             guidelines_md=demo.guidelines, settings={"min_chars": demo.min_chars})
        res = store.import_records(run.DEMONSTRATIONS, rows)
    finally:
        store.dispose()
    return {"project": run.DEMONSTRATIONS, "prompts": res.prompts, "items": res.items,
            "to_edit": sum("completion" in r for r in rows), "policy": cfg.policy}


def demonstration_rows(cfg: PipelineConfig, run: RunFolder, chat: bool) -> tuple[list[dict], dict]:
    """People's demonstrations as SFT rows: conversational (prompt messages, the assistant's answer) when `chat`
    (conversation mode, or a policy with a chat template of its own), else plain prompt/completion text as the
    pipeline's prompts are (the answer joined to the prompt by a space, as a model's continuation would be).
    No demonstration is a UserError saying to write them first."""
    store = Store(str(run.feedback_db))
    try:
        project = store.get_project(run.DEMONSTRATIONS)
        rows, summary = export_demonstration_rows(store, project.id, "sft", review=cfg.demonstrations.review)
    finally:
        store.dispose()
    if not rows:
        raise UserError(f"project {run.DEMONSTRATIONS}: {empty_message(summary)}. Write demonstrations in the app "
                        f"(alignloop feedback serve --db {run.feedback_db}) and resume.")
    return [chat_row(r) if chat else plain_row(r) for r in rows], summary


def chat_row(row: dict) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    return {"prompt": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
            "completion": [{"role": "assistant", "content": completion}] if isinstance(completion, str)
            else completion}


def plain_row(row: dict) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str):   # a chat prompt of one user message reads as its text
        if len(prompt) != 1 or prompt[0].get("role") != "user":
            return row
        prompt = prompt[0]["content"]
    if not isinstance(completion, str):
        completion = completion[-1]["content"]
    if prompt and completion and not prompt[-1].isspace() and not completion[0].isspace():
        completion = " " + completion
    return {"prompt": prompt, "completion": completion}


# ------------------------------------------------------------------------------------------------ conversations
def stage_converse(folder: Path, cfg: PipelineConfig, run: RunFolder, round_: int, policy: str,
                   train_prompts: list[str]) -> dict:
    """The round's conversation project: `feedback.num_prompts` training prompts as openings, the round's policy
    served (two samples per turn, `feedback.max_new_tokens` / `temperature`), at most `feedback.max_turns` turns."""
    fb = cfg.feedback
    prompts = pick_prompts(train_prompts, fb.num_prompts, fb.seed + round_)
    rows = [{"prompt": p} for p in prompts]
    write_rows(rows, run.samples(round_))
    model = local_or_hub(policy)
    guidelines = fb.guidelines if fb.guidelines != FeedbackSettings.guidelines else CONVERSATION_GUIDELINES
    store = Store(str(run.feedback_db))
    try:
        store.create_project(run.project(round_), "conversation", overlap_k=fb.overlap_k, guidelines_md=guidelines,
                             settings={"models": [model], "max_turns": fb.max_turns,
                                       "generation": {"max_new_tokens": fb.max_new_tokens,
                                                      "temperature": fb.temperature}})
        res = store.import_records(run.project(round_), rows)
    finally:
        store.dispose()
    return {"project": run.project(round_), "mode": "conversation", "openings": res.items, "policy": model}


def has_conversation_pairs(run: RunFolder, round_: int) -> bool:
    """Whether people have chosen at least one turn in the round's conversation project."""
    store = Store(str(run.feedback_db))
    try:
        rows, _ = export_conversation_rows(store, store.get_project(run.project(round_)).id, "preference")
        return bool(rows)
    finally:
        store.dispose()


def stage_conversation_label(folder: Path, cfg: PipelineConfig, run: RunFolder, round_: int) -> dict:
    """The round's conversations as preference pairs (one per chosen turn) and what people did: conversations and
    turns, pairs per labeler and per strength, the ended conversations' mean 1-7 rating (no pairwise agreement:
    every labeler has their own conversation)."""
    project = run.project(round_)
    store = Store(str(run.feedback_db))
    try:
        p = store.get_project(project)
        rows, summary = export_conversation_rows(store, p.id, "preference")
        ratings = [r["likert"] for r in store.current_judgements(p.id) if r.get("likert") is not None]
    finally:
        store.dispose()
    if not rows:
        raise UserError(f"project {project}: no turn chosen yet. Converse in the app "
                        f"(alignloop feedback serve --db {run.feedback_db}) and resume.")
    write_rows(rows, run.preferences(round_))
    info = {"task_type": "conversation", "pairs": len(rows), "conversations": summary.get("conversations"),
            "turns": summary.get("turns"), "ended": len(ratings), "mean_rating": mean(ratings) if ratings else None,
            "ratings": dict(sorted(Counter(ratings).items())),
            "per_labeler": dict(Counter(str(r.get("labeler", "?")) for r in rows)),
            "strengths": dict(Counter(str(r.get("strength")) for r in rows)), "labelers_trained_on": "human",
            "export": summary, "preferences": str(run.preferences(round_))}
    run.quality(round_).write_text(json.dumps(info, indent=1, default=str))
    return info
