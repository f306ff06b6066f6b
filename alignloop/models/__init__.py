"""Models: loading (hub id or local path, dtype, LoRA), padding-aware forwards, reward models, value heads,
classifier rewards, and the tiny local model builder (`alignloop.models.tiny`).

Loading
    load_causal_lm(name_or_path, dtype=None, lora=None, gradient_checkpointing=False, trust_remote_code=False)
    load_sequence_classifier(name_or_path, dtype=None, num_labels=None, lora=None, ...)
    load_tokenizer(name_or_path, padding_side="right", trust_remote_code=False)   # pad = EOS when it has none
    resolve_dtype(dtype)      None -> float32, "auto", "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16"
    A missing local folder, a folder without config.json, an unknown dtype -> alignloop.errors.UserError.

LoRA (peft)
    LoraOptions(r=8, alpha=16, dropout=0.05, target_modules="all-linear", bias="none", modules_to_save=None,
                use_rslora=False);  apply_lora(model, options, task_type="CAUSAL_LM")
    has_adapter(model);  `with reference_mode(model): ...` -> the reference, eval mode, no grad; restored on exit:
    adapter off (the base model; no second copy), or, after `keep_reference(model)`, the adapter's starting
    values swapped in (a policy that starts from a trained adapter; a copy the adapter's size). Both raise
    ValueError on a model without an adapter.

Padding-aware forwards (position ids = attention_mask.cumsum(1) - 1, clamped at 0)
    model_forward(model, input_ids, attention_mask, return_hidden=False) -> logits[B,T,V] (or (logits, hidden))
    position_ids_from_attention_mask(attention_mask) -> [B,T]
    last_token_index(attention_mask, input_ids=None, pad_token_id=None) -> [B]

Reward models: a transformers AutoModelForSequenceClassification with num_labels=1 (plain transformers loads what
we save and scores it the same), read at the last real token that is not the config's pad id, as transformers
reads it (with pad == EOS: before the EOS), found from the attention mask too, so left padding works.
    RewardModel.from_pretrained(path, dtype=None, lora=None, heads=None, ...)  (from a causal-LM checkpoint: new
        head(s) with init N(0, 1/sqrt(d+1)));  rm(input_ids, attention_mask, head=None) -> scores[B];
        rm.head_scores(input_ids, attention_mask) -> [B,H];  rm.head_names, rm.num_heads, rm.head_index(name);
        rm.token_scores(..., head=None) -> [B,T];  rm.save_pretrained(dir, tokenizer=None, merge_lora=True)
    Multi-head reward models (one head per criterion, labeler group or labeler; shared backbone): num_labels = H,
        config.id2label = the head names, config.alignloop_heads = {"by": "criterion"|"group"|"labeler", "names",
        "population": head | None}; a one-head model has no alignloop_heads. `heads` = that dict.
        heads_info(config | model | folder) -> dict | None;  check_heads(dict);  set_heads(config, heads)
        HEADS_BY = ("criterion", "group", "labeler");  POPULATION_HEAD = "population" (the head of every pair)
    score_sequences(model, input_ids, attention_mask, label=0) -> [B];  sequence_logits(...) -> [B, num_labels]
    has_decoder_head(model): a decoder `score` head (read at the last real token) rather than an encoder classifier
    context_length(model, tokenizer=None): the most tokens a classifier takes (RoBERTa's reserved positions off)
    CriticModel / critic_from_reward_model(path_or_rm) -> critic(input_ids, attention_mask) -> values[B,T]
    ClassifierReward.from_pretrained(path, positive_label=1 | "LABEL_NAME") ; cr(texts) -> [B] (keep="start"|"end");
        cr.score_tokens(input_ids, attention_mask) -> [B]  (positive-class logit)

Process reward models (`alignloop.models.prm`): a transformers AutoModelForTokenClassification (num_labels 1 for
BCE, 3 for bad/neutral/good), its config marked `alignloop_prm` = {"loss", "separator"}, read at step ends
    build_prm(path, loss="bce"|"ce", dtype=None, lora=None, ...) (a causal LM's backbone + a new head, or a PRM)
    load_prm(path, dtype=None, device=None) -> (model, tokenizer);  is_prm_folder(path);  prm_info(path_or_model)
    prm_logits(model, input_ids, attention_mask) -> [B,T,C];  step_probabilities(..., step_mask) -> [B,T]
    batch_steps(examples, pad_token_id) -> tensors;  score_steps(model, tok, prompts, step_lists) -> [[p]]

Policy + value head (PPO)
    CausalLMWithValueHead.from_pretrained(path, dtype=None, lora=None, ...) / CausalLMWithValueHead(lm)
        model(input_ids, attention_mask) -> LogitsAndValues(logits[B,T,V], values[B,T] float32), one pass;
        zero-initialised value head;  save_pretrained(dir, tokenizer=None, merge_lora=True) writes the LM with
        transformers' save_pretrained plus value_head.safetensors.
    ActorCritic(policy, critic=None): PPO's policy + value function, model(ids, mask) -> (logits, values)
"""
from __future__ import annotations

from alignloop.models.forward import (
    backbone_hidden_states,
    last_token_index,
    model_forward,
    position_ids_from_attention_mask,
    unwrap_model,
)
from alignloop.models.loading import (
    LoraOptions,
    apply_lora,
    check_name_or_path,
    has_adapter,
    keep_reference,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    reference_context,
    reference_mode,
    resolve_dtype,
)
from alignloop.models.prm import (
    batch_steps,
    build_prm,
    is_prm_folder,
    load_prm,
    prm_info,
    prm_logits,
    score_steps,
    step_probabilities,
)
from alignloop.models.reward import (
    HEADS_BY,
    POPULATION_HEAD,
    ClassifierReward,
    CriticModel,
    RewardModel,
    check_heads,
    context_length,
    critic_from_reward_model,
    has_decoder_head,
    heads_info,
    init_reward_head,
    score_sequences,
    sequence_logits,
    set_heads,
    token_logits,
)
from alignloop.models.value_head import (
    VALUE_HEAD_FILE,
    ActorCritic,
    CausalLMWithValueHead,
    LogitsAndValues,
    ValueHead,
)

__all__ = [
    "HEADS_BY",
    "POPULATION_HEAD",
    "VALUE_HEAD_FILE",
    "ActorCritic",
    "CausalLMWithValueHead",
    "ClassifierReward",
    "CriticModel",
    "LogitsAndValues",
    "LoraOptions",
    "RewardModel",
    "ValueHead",
    "apply_lora",
    "backbone_hidden_states",
    "batch_steps",
    "build_prm",
    "check_heads",
    "check_name_or_path",
    "context_length",
    "critic_from_reward_model",
    "has_adapter",
    "has_decoder_head",
    "heads_info",
    "init_reward_head",
    "is_prm_folder",
    "keep_reference",
    "last_token_index",
    "load_causal_lm",
    "load_prm",
    "load_sequence_classifier",
    "load_tokenizer",
    "model_forward",
    "position_ids_from_attention_mask",
    "prm_info",
    "prm_logits",
    "reference_context",
    "reference_mode",
    "resolve_dtype",
    "score_sequences",
    "score_steps",
    "sequence_logits",
    "set_heads",
    "step_probabilities",
    "token_logits",
    "unwrap_model",
]
