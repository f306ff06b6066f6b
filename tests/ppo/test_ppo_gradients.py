"""PPO's gradient, checked exactly rather than smoke-tested: the entropy bonus adds exactly −ent_coef · ∇(mean entropy
over the response tokens), and gradient accumulation (1, 2 or 4 micro-batches per minibatch) gives the same gradient.

Gradients are read at the first optimizer step (the policy still equals the one that sampled, so every run scores and
trains on the same rollout). Gradient clipping is off (max_grad_norm=0), so what is read is the loss's own gradient.
Adam's first step is g/(|g|+eps) ≈ sign(g), blind to a wrong scale, hence gradients rather than weights.
"""
import pytest
import torch

from alignloop.losses import entropy_from_logits, masked_sum
from alignloop.trainers.ppo import PPOConfig, PPOTrainer

from .conftest import make_target_reward, small_lm


def _cfg(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "total_updates": 1, "rollout_batch_size": 8, "max_new_tokens": 10,
            "temperature": 0.7, "learning_rate": 1e-3, "progress": False, "save_final": False, "tensorboard": False,
            "sample_every": 0, "num_ppo_epochs": 1, "num_mini_batches": 1, "max_grad_norm": 0.0,
            # one token in 7 stops a response: lengths differ, so micro-batches hold different token counts
            "stop_token_ids": list(range(3, 300, 7))}
    base.update(kw)
    return PPOConfig(**base)


def _trainer(tmp_path, tok, prompts, callbacks=(), **kw):
    torch.manual_seed(0)
    return PPOTrainer(model=small_lm(tok), reward=make_target_reward(tok), args=_cfg(tmp_path, **kw),
                      train_dataset=prompts, tokenizer=tok, callbacks=list(callbacks))


def _first_step_grads(tr: PPOTrainer) -> dict[str, torch.Tensor]:
    """Run `tr` and return every parameter's gradient as the first optimizer step saw it."""
    grads: dict[str, torch.Tensor] = {}
    step = tr.optimizer.step

    def record(*args, **kwargs):
        if not grads:
            grads.update({n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                          for n, p in tr.model.named_parameters()})
        return step(*args, **kwargs)

    tr.optimizer.step = record
    tr.train()
    assert grads
    return grads


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(largest |a − b| over all parameters, largest |a|)."""
    assert a.keys() == b.keys()
    return (max((a[k] - b[k]).abs().max().item() for k in a), max(x.abs().max().item() for x in a.values()))


def test_entropy_bonus_adds_exactly_its_gradient(tmp_path, tok, prompts):
    """g(ent_coef=c) − g(ent_coef=0) = −c · ∇ [Σ_tokens H_t / n_tokens], H_t the entropy of softmax(logits_t / T)
    on the response tokens (the loss is a token mean over the minibatch). The right side is computed here from the
    rollout with an untrained copy of the same model, outside the trainer."""
    c = 0.5
    seen = []
    with_ent = _first_step_grads(_trainer(tmp_path / "a", tok, prompts, [seen.append], ent_coef=c))
    without = _first_step_grads(_trainer(tmp_path / "b", tok, prompts, ent_coef=0.0))
    rollout = seen[0].rollout
    fresh = _trainer(tmp_path / "c", tok, prompts).model
    ids, am, p, r = rollout.rows(torch.arange(len(rollout)))
    logits, _ = fresh(ids, am)
    ent = entropy_from_logits(logits[:, p - 1:p + r - 1], 0.7)
    mask = rollout.response_mask[:, :r]
    (-c * masked_sum(ent, mask) / mask.sum()).backward()
    expected = {n: q.grad if q.grad is not None else torch.zeros_like(q) for n, q in fresh.named_parameters()}
    diff = {n: with_ent[n] - without[n] for n in with_ent}
    worst, scale = _worst(diff, expected)
    full = max(g.abs().max().item() for g in without.values())
    # g(c) − g(0) cancels two gradients of size `full`: float32 leaves a few ulps of `full` (seen 3.8e-7·full); a
    # missing, doubled or wrongly signed entropy term is off by `scale`, here ~1e-2·full
    assert scale > 1e-3 * full, (scale, full)
    assert worst <= 1e-5 * full, (worst, full)
    # and the value head gets none of it
    assert all(diff[n].abs().max() <= 1e-5 * full for n in diff if "v_head" in n or "critic" in n)


@pytest.mark.parametrize("accumulation", [2, 4])
def test_gradient_accumulation_gives_the_same_gradient(tmp_path, tok, prompts, accumulation):
    """One minibatch of 8 rollouts in 1, 2 or 4 micro-batches: the per-token mean over the minibatch's tokens is the
    same loss, so the gradient is the same (policy, value and entropy terms; ent_coef on)."""
    seen = []
    one = _first_step_grads(_trainer(tmp_path / "one", tok, prompts, [seen.append], ent_coef=0.01))
    acc = _first_step_grads(_trainer(tmp_path / "acc", tok, prompts, ent_coef=0.01,
                                     gradient_accumulation_steps=accumulation))
    worst, scale = _worst(acc, one)
    assert scale > 1e-3
    assert len(set(seen[0].response_mask.sum(1).tolist())) > 2   # responses of several lengths
    # float32 sums in another order: a few ulps of the largest gradient (seen 1.9e-7 relative); a micro-batch scaled
    # by its own token count instead of the minibatch's is off by tens of percent
    assert worst <= 1e-5 * scale, (worst, scale)
