"""AI feedback (Bai et al. 2022; Lee et al. 2023): a constitution of written principles, the supervised CAI stage
(critique -> revision -> SFT data) and AI labelers that judge pairs against the principles into the feedback store,
beside people's labels.

    constitution.py   the constitution file: principles, templates, validation, the default
    cai.py            `alignloop cai`: sample, critique and revise for some rounds, write SFT data (optionally SFT)
    judge.py          `alignloop judge` / `alignloop feedback judge`: log-probability judges (a causal LM or a Python
                      function), both orders, optional chain-of-thought, judgements stored as labelers of kind "ai"
"""
from alignloop.ai_feedback.constitution import (
    DEFAULT_CONSTITUTION,
    Constitution,
    Principle,
    Templates,
    load_constitution,
    parse_constitution,
)

__all__ = ["DEFAULT_CONSTITUTION", "Constitution", "Principle", "Templates", "load_constitution",
           "parse_constitution"]
