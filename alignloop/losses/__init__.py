"""Pure loss functions: tensors in, unreduced tensors out. Reduce with `masked_mean` (or `.mean()`).

Every trainer uses these; none re-derives them. Shapes are documented in each module.
"""
from alignloop.losses.critic_free import (
    AGGREGATIONS,
    MovingAverageBaseline,
    grpo_advantages,
    reinforce_advantages,
    rloo_advantages,
    sequence_kl_reward,
    token_loss_weights,
)
from alignloop.losses.kto import kto_loss, kto_reference_point
from alignloop.losses.logprobs import entropy_from_logits, logprobs_from_logits
from alignloop.losses.masked import masked_max, masked_mean, masked_sum, masked_var, masked_whiten
from alignloop.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalty,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
)
from alignloop.losses.preference import (
    best_of_k_loss,
    bradley_terry_loss,
    center_rewards_penalty,
    dpo_loss,
    implicit_reward,
    plackett_luce_loss,
)
from alignloop.losses.prm import (
    PRM_CLASSES,
    good_probability,
    label_classes,
    step_bce_loss,
    step_ce_loss,
    step_targets,
)

__all__ = [
    "AGGREGATIONS",
    "PRM_CLASSES",
    "AdaptiveKLController",
    "FixedKLController",
    "MovingAverageBaseline",
    "best_of_k_loss",
    "bradley_terry_loss",
    "center_rewards_penalty",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "good_probability",
    "grpo_advantages",
    "implicit_reward",
    "kl_penalty",
    "kto_loss",
    "kto_reference_point",
    "label_classes",
    "logprobs_from_logits",
    "masked_max",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "plackett_luce_loss",
    "ppo_policy_loss",
    "ppo_rewards",
    "ppo_value_loss",
    "reinforce_advantages",
    "rloo_advantages",
    "sequence_kl_reward",
    "step_bce_loss",
    "step_ce_loss",
    "step_targets",
    "token_loss_weights",
]
