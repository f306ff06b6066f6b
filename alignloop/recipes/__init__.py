"""Recipes: the shared verbs (sampling, scoring) composed with the trainers, with no training loop of their own.

    best_of_n.py            `alignloop generate`: N completions per prompt, scored, the best kept
    rejection_sampling.py   `alignloop rs`: sample N, score, keep the best, SFT on them (SFTTrainer), repeat
"""
