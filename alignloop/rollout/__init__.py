"""Rollouts: sampling responses from a policy.

    sampler.py       SamplingParams, Rollout (prompt/response ids and masks, sampling log-probs, stopped), the Sampler
                     protocol a backend implements, HFSampler (KV cache), left_pad, filter_logits
    completions.py   N completions per prompt as text (sample_completions), encode_prompts, decode_responses,
                     response_logprobs: what every non-PPO caller samples through
"""
from alignloop.rollout.completions import (
    Completion,
    decode_responses,
    encode_prompts,
    response_logprobs,
    sample_completions,
)
from alignloop.rollout.sampler import HFSampler, Rollout, Sampler, SamplingParams, filter_logits, left_pad

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
    "sample_completions",
]
