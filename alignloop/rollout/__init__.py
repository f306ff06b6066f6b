"""Rollouts: sampling responses from a policy.

    sampler.py       SamplingParams, Rollout (prompt/response ids and masks, sampling log-probs, stopped), the Sampler
                     protocol a backend implements, HFSampler (KV cache; optional per-step `on_step` hook), left_pad,
                     filter_logits
    completions.py   N completions per prompt as text (sample_completions; `stream=` the texts as they grow),
                     encode_prompts, decode_responses, response_logprobs: what every non-PPO caller samples through
    steps.py         step_end_positions (the token where each reasoning step of a response ends), rollout_step_ends:
                     where process supervision puts step rewards
"""
from alignloop.rollout.completions import (
    Completion,
    decode_responses,
    encode_prompts,
    response_logprobs,
    sample_completions,
)
from alignloop.rollout.sampler import HFSampler, Rollout, Sampler, SamplingParams, filter_logits, left_pad
from alignloop.rollout.steps import rollout_step_ends, step_end_positions

__all__ = [
    "Completion",
    "HFSampler",
    "Rollout",
    "Sampler",
    "SamplingParams",
    "decode_responses",
    "encode_prompts",
    "filter_logits",
    "left_pad",
    "response_logprobs",
    "rollout_step_ends",
    "sample_completions",
    "step_end_positions",
]
