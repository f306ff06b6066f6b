"""Tiny policies and rewards for the critic-free trainer's tests, and a sampler whose samples do not depend on how
the batch is split (over processes or micro-batches)."""
import zlib

import pytest
import torch
from ppo.conftest import make_target_reward, small_lm  # noqa: F401 - the tiny task of the PPO tests, shared

from alignloop.models.tiny import default_corpus, train_tokenizer
from alignloop.rollout import HFSampler, Rollout


@pytest.fixture(scope="session")
def tok():
    t = train_tokenizer(vocab_size=300)
    t.padding_side = "left"
    return t


@pytest.fixture(scope="session")
def prompts():
    return [" ".join(s.split()[: 1 + i % 6]) for i, s in enumerate(default_corpus(64, seed=1))]


class GroupSeededSampler:
    """Samples each group (the rows of one prompt, adjacent) with the torch RNG seeded from the prompt's tokens and
    the call number, then pads the groups into one Rollout: the same completions whether the batch is on one process
    or split over two (each process's own RNG would otherwise differ)."""

    def __init__(self, model, tokenizer, seed=0):
        self.inner = HFSampler(model, tokenizer, cpu_threads=None)
        self.pad = tokenizer.pad_token_id
        self.seed, self.calls = seed, 0

    def generate(self, prompts_token_ids, params):
        self.calls += 1
        groups, start = [], 0
        while start < len(prompts_token_ids):
            end = start
            while end < len(prompts_token_ids) and list(prompts_token_ids[end]) == list(prompts_token_ids[start]):
                end += 1
            rng = torch.get_rng_state()
            torch.manual_seed(zlib.crc32(str((list(prompts_token_ids[start]), self.calls, self.seed)).encode()))
            groups.append(self.inner.generate(prompts_token_ids[start:end], params))
            torch.set_rng_state(rng)
            start = end
        return concat_rollouts(groups, self.pad)


def concat_rollouts(parts: list[Rollout], pad: int) -> Rollout:
    P = max(r.prompt_ids.shape[1] for r in parts)
    R = max(r.response_ids.shape[1] for r in parts)

    def left(x, width, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def right(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return Rollout(prompt_ids=torch.cat([left(r.prompt_ids, P, pad) for r in parts]),
                   prompt_mask=torch.cat([left(r.prompt_mask, P, False) for r in parts]),
                   response_ids=torch.cat([right(r.response_ids, R, pad) for r in parts]),
                   response_mask=torch.cat([right(r.response_mask, R, False) for r in parts]),
                   logprobs=torch.cat([right(r.logprobs, R, 0.0) for r in parts]),
                   policy_logprobs=torch.cat([right(r.policy_logprobs, R, 0.0) for r in parts]),
                   stopped=torch.cat([r.stopped for r in parts]), pad_token_id=pad)

