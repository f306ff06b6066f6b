"""alignloop.data: read preference/SFT/prompt data in TRL's formats, convert it, tokenise it, and batch it.

Reading (JSONL, JSON list or {"data": [...]}, Parquet, CSV/TSV, a `datasets` save_to_disk folder, a hub id, or rows
already in memory: a list of dicts or a datasets.Dataset, named "row i" in errors):
    read_rows(path_or_id, split="train", skip_bad_rows=False, stats=None) -> list[Row]   # dicts with .where
    read_raw_rows(path_or_id, split, stats) -> list[Row]   # unreadable rows kept as placeholders with .error set
    write_rows(rows, path) -> Path            # format from the suffix; written aside and renamed into place
    check_writable(path) -> Path              # a DataError up front when write_rows could not write that suffix
    prompt_texts(source, tokenizer=None, max_prompts=None, user_tag=None) -> list[str]   # prompts of any source,
        ready to sample; with a user_tag template, rows with a `user` field get their user's tag in front
    detect_kind(columns) -> "sft" | "preference" | "ranking" | "unpaired" | "steps" | "prompt" | None
    load_records(path, kind=None, *, split, tokenizer, include_ties, margins, skip_bad_rows) -> (records, DataStats)
    load_sft(path, *, kind=None, split="train", tokenizer=None, skip_bad_rows=False) -> (list[dict], DataStats)
    load_preferences(path, *, kind=None, split, tokenizer, include_ties=False, margins="small", skip_bad_rows)
        -> (list[PreferenceGroup], DataStats)
    load_unpaired(path, ...) -> (list[dict], DataStats);  load_prompts(path, ...) -> (list[dict], DataStats)

Formats (detected from the first row's columns, or forced with kind=; extra columns are ignored):
    sft         text | messages | prompt + completion            (texts: strings or lists of {role, content})
    preference  prompt + chosen + rejected [+ margin | strength]; or chosen + rejected (implicit prompt: the shared
                start, cut before a whitespace; conversational: all but the last assistant message)
    ranking     prompt + completions (K) + ranking (K ints, 1 = best, equal = tie); or prompt + completions + best
                (best of K: the 0-based index of the one picked, read as the ranking [2, .., 1, .., 2])
    unpaired    prompt + completion + label (bool, KTO-style thumbs up/down; stays unpaired)
    steps       prompt + completions (the steps) + labels (+1/0/-1 or booleans per step) [+ soft_labels]
    prompt      prompt
  In CSV, list fields (messages, completions, ranking, conversational texts) are JSON text.

Labeler context (optional columns of preference, ranking, unpaired and sft rows; `META_COLUMNS`): labeler (str, a
pseudonymous id), labeler_attributes ({str: str} set by an admin; the labeler's group is ["group"]), comment (str),
flags (list of str), time_spent_ms (int >= 0), criterion (non-empty str: which question of a multi-question item);
consensus rows (several labelers' one row): labelers, comments (lists of str). Readers validate them (a wrong type
is a DataError naming row and field; null, NaN or an empty CSV cell is absent; in CSV lists and objects are JSON
text) and keep them: `PreferenceGroup.meta` (a dict of the columns present), extra keys of unpaired and sft records.
`groups_to_rows` and `groups_to_unpaired` write them back. Flat rows of one `group` merge into one PreferenceGroup
only when their meta is equal (the same labeler, criterion, comment, ...): a group's meta is that of every one of
its pairs; rows of one `group` that differ are separate groups (each pair keeping its own pair_weight).
Prompt rows keep `user` (str, a valid user name). User tags (`alignloop.data.users`):
    USER_TAG = "<user:{user}> ";  tag_prompt(prompt, user, template=USER_TAG) -> str (user None: unchanged)
    split_user_tag(text, template=USER_TAG) -> (user | None, rest);  check_user(name, template): non-empty, no
    whitespace, none of the characters that end the template's tag (">") (a DataError otherwise);
    meta_key(meta, "criterion" | "group" | "labeler") -> str | None: whose judgement (the labeler's group is
    labeler_attributes["group"])

Step-level data (process reward models; `alignloop.data.steps`):
    STEP_SEPARATOR = "\n"; split_steps(text, separator) -> list[str]; join_steps(steps, separator) -> str
    read_steps(path_or_rows, *, require_labels=True, separator, tokenizer=None, skip_bad_rows=False) -> list[dict]
        {"prompt", "completions", "labels" (+1/0/-1 or None per step), ["soft_labels"], ["outcome"]}
    tokenize_steps(tokenizer, prompt_text, steps, separator, max_length=None, *, truncation="keep_start")
        -> (input_ids, step_end_positions): the step's score is read at the last token of its separator
    tokenize_step_records(records, tokenizer, ...) -> ([{input_ids, step_ends, labels, soft_labels}], DataStats)
    outcome_rows(rows): the outcome (ORM) view, only the last step labelled (with the solution's outcome)

Normalised records (all texts strings once chat-templated with a tokenizer; lists of messages before):
    sft {"prompt", "completion"} (text -> prompt ""; messages split before the last assistant message: earlier
    assistant turns are context, not trained on); unpaired {"prompt", "completion", "label"}; prompt {"prompt"};
    preference/ranking -> PreferenceGroup(prompt, pairs=[Pair(chosen, rejected, margin, tie)], pair_weight,
    completions, ranking, meta). A flat pair is a group of one with pair_weight 1.

Chat templates: with tokenizer=..., conversational data is rendered with tokenizer.apply_chat_template; the prompt
with add_generation_prompt=True, the completion = rendered(prompt + completion) minus the rendered prompt. A
tokenizer without a chat template is a DataError.

Conversions:
    rankings_to_pairs(completions, ranking, include_ties=False) -> list[Pair]   # all C(K,2) pairs, index order
    ranking_pair_weight(K) -> 1/C(K,2)                                          # InstructGPT's per-pair scale
        (with tied pairs skipped a prompt's weights sum to (C(K,2) - ties)/C(K,2): ties carry no preference)
    strength_to_margin(strength, mapping="small"|"large"|dict) -> float          # Llama 2 Table 28
    groups_to_rows(groups, with_ties=False) -> TRL preference rows {prompt, chosen, rejected, margin, pair_weight,
        group} (reading them back regroups by `group`);  groups_to_unpaired(groups) -> KTO rows
    Ties (include_ties=True): Pair(a, b, margin=0, tie=True). A reward model should not push a tie apart: use the
    Bradley-Terry loss with target 1/2, i.e. ½(-log σ(r_a - r_b)) + ½(-log σ(r_b - r_a)), minimised at r_a = r_b;
    DPO should skip ties (its loss has no tie term). Ties are skipped by default (counted in stats.ties_skipped),
    also flat rows with tie=true (as groups_to_rows(with_ties=True) writes them).
    Strength margins, "small" (default): significantly_better 1, better 2/3, slightly_better 1/3,
    negligibly_better (alias unsure) 0; "large": 3, 2, 1, 0. A `strength` column becomes `margin` when margin is empty.

Tokenisation (prompt and completion tokenised separately without special tokens, then concatenated; EOS appended to
completions unless add_eos=False; BOS prepended only with add_bos=True):
    tokenize_sft(records, tokenizer, *, max_length=None, truncation="keep_end", max_prompt_length=None,
        add_eos=True, add_bos=False, stats=None) -> (examples, DataStats)
    tokenize_preferences(groups, tokenizer, *, same options) -> (tokenised groups, DataStats)
    tokenize_rankings(groups, tokenizer, *, same options) -> (one entry per group, each completion once, DataStats)
    tokenize_prompts(records, tokenizer, *, max_length=None, add_bos=False) -> ({"input_ids"}, DataStats)
    reward_input_ids(tokenizer, prompts, completions, add_eos=True, max_length=None) -> list[list[int]]: one
        (prompt, completion) sequence as tokenize_preferences builds it, to score text with a reward model
    with_bos_eos(prompt_ids, completion_ids, tokenizer, add_eos, add_bos): the BOS/EOS rule of all of these
    truncate(prompt_ids, completions, max_length, truncation, max_prompt_length) -> (prompt, completions, cut) | None
    pack_sft(examples, max_length) -> packed rows; run them as model(input_ids, position_ids=..., use_cache=False)
        with no attention_mask, so transformers masks attention block-diagonally (tested to equal separate passes)
  truncation: "keep_end" cuts the prompt from the left first (down to max_prompt_length, default max_length // 2),
  then the completions' ends; "keep_start" keeps the first max_length tokens; "drop" drops the example. Examples
  left with no completion tokens are dropped. stats.truncated / stats.dropped count examples (SFT) or pairs.

Collators (torch tensors; padding_side "right" for training, "left" for generation); position ids everywhere come
from `position_ids_from_attention_mask(attention_mask)` (real tokens count 0, 1, 2, ...: the one formula of every
batch, forward and sampling step):
    SFTCollator(pad_token_id, padding_side="right", pad_to_multiple_of=None)
    PreferenceCollator(pad_token_id, padding_side="right", pad_to_multiple_of=None)   # DPO and RM
    RankingCollator(pad_token_id, padding_side="right", pad_to_multiple_of=None)      # RM, each completion once
  How trainers use a PreferenceCollator batch (P pairs, G groups):
    DPO: logps = per-row sum of token log-probs over response_mask (labels shifted by one, as usual);
      chosen = logps[:P], rejected = logps[P:]; dpo_loss(...) per pair; skip tie pairs; plain pairs have weight 1.
    RM: s = score at the last real token of each row; loss = sum(pair_weight * bradley_terry_loss(s[:P], s[P:],
      margin)) / G, so each prompt counts once whatever its K (InstructGPT); tie pairs use the tie loss above.

Errors: DataError (a UserError) names file, line (1-based, JSONL/CSV; the CSV header is line 1) or index (0-based,
JSON/Parquet/datasets), field and what was expected, e.g. "pairs.jsonl line 7, field 'chosen': expected a string or
a list of messages, got null". skip_bad_rows=True skips bad rows (invalid JSON included), counts them in
stats.bad_rows (messages in stats.errors) and logs a warning.

Glossary (B = batch, T = tokens, P = pairs in a batch, G = groups in a batch, K = completions per prompt, S = packed
examples per row):
    tokenize_sft example    input_ids [T], labels [T] (-100 = prompt), prompt_length
    packed row              input_ids [T], labels [T] (first token of each example -100), position_ids [T]
                            (restart at 0 per example), seq_lens [S]
    tokenised pref group    {"pairs": [{chosen_input_ids, rejected_input_ids, chosen_labels, rejected_labels,
                            prompt_length, margin, tie}], "pair_weight"}
    SFTCollator batch       input_ids, attention_mask, labels, position_ids [B,T]; packed: + seq_lens [B,S],
                            cu_seqlens [N+1] int32
    PreferenceCollator      input_ids, attention_mask, position_ids, labels, response_mask [2P,T] (rows :P chosen,
                            P: rejected); margin, pair_weight [P] float; group_index [P] long; tie [P] bool
    RankingCollator         input_ids, attention_mask, position_ids, labels, response_mask [N,T] (N = distinct
                            completions); group_index [N]; chosen_index, rejected_index, pair_group_index [P] long
                            (rows of N); margin, pair_weight [P]; tie [P]; order, ranks, valid [G,K] (best first)
    DataStats               kind, rows, bad_rows, errors, records, pairs, ties_skipped, truncated, dropped
"""
from __future__ import annotations

import importlib

from alignloop.data.conversions import (
    STRENGTH_MARGINS,
    Pair,
    PreferenceGroup,
    groups_to_rows,
    groups_to_unpaired,
    implicit_messages_prompt,
    implicit_text_prompt,
    ranking_pair_weight,
    rankings_to_pairs,
    strength_to_margin,
)
from alignloop.data.errors import DataError, DataStats
from alignloop.data.readers import Row, check_writable, read_raw_rows, read_rows, write_rows
from alignloop.data.records import (
    KINDS,
    META_COLUMNS,
    detect_kind,
    is_conversational,
    load_preferences,
    load_prompts,
    load_records,
    load_sft,
    load_unpaired,
    parse_meta,
    parse_rows,
    prompt_texts,
    render_record,
)
from alignloop.data.steps import (
    STEP_SEPARATOR,
    join_steps,
    outcome_label,
    outcome_rows,
    prompt_string,
    read_steps,
    split_steps,
    tokenize_step_records,
    tokenize_steps,
)
from alignloop.data.tokenize import (
    IGNORE_INDEX,
    pack_sft,
    reward_input_ids,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_rankings,
    tokenize_sft,
    truncate,
    with_bos_eos,
)
from alignloop.data.users import META_KEYS, USER_TAG, check_user, meta_key, split_user_tag, tag_prompt

__all__ = [
    "IGNORE_INDEX",
    "KINDS",
    "META_COLUMNS",
    "META_KEYS",
    "STEP_SEPARATOR",
    "STRENGTH_MARGINS",
    "USER_TAG",
    "DataError",
    "DataStats",
    "Pair",
    "PreferenceCollator",
    "PreferenceGroup",
    "RankingCollator",
    "Row",
    "SFTCollator",
    "check_user",
    "check_writable",
    "detect_kind",
    "groups_to_rows",
    "groups_to_unpaired",
    "implicit_messages_prompt",
    "implicit_text_prompt",
    "is_conversational",
    "join_steps",
    "load_preferences",
    "load_prompts",
    "load_records",
    "load_sft",
    "load_unpaired",
    "meta_key",
    "outcome_label",
    "outcome_rows",
    "pack_sft",
    "pad",
    "pad_batch",
    "parse_meta",
    "parse_rows",
    "position_ids_from_attention_mask",
    "prompt_string",
    "prompt_texts",
    "ranking_pair_weight",
    "rankings_to_pairs",
    "read_raw_rows",
    "read_rows",
    "read_steps",
    "render_record",
    "reward_input_ids",
    "split_steps",
    "split_user_tag",
    "strength_to_margin",
    "tag_prompt",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_rankings",
    "tokenize_sft",
    "tokenize_step_records",
    "tokenize_steps",
    "truncate",
    "with_bos_eos",
    "write_rows",
]


# The collators need torch; everything else here is plain Python: they load on first use, so that reading and
# writing data (the feedback server's import files, `alignloop data validate`) does not import torch.
_COLLATORS = ("PreferenceCollator", "RankingCollator", "SFTCollator", "pad", "pad_batch",
              "position_ids_from_attention_mask")
_LAZY = dict.fromkeys(_COLLATORS, "alignloop.data.collators")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignloop.data' has no attribute {name!r}")
