"""The arithmetic demo's toy domain: chains of 2-4 operations, solved step by step.

Everything is generated locally and deterministically from a seed (no downloads):

    p = Problem(7, (("+", 5), ("*", 3), ("-", 9)), modulus=10)   # or random_problem(rng, modulus=10)
    p.prompt                                      # "Q: 7+5*3-9 mod 10\n"   (left to right, no precedence)
    p.steps()                                     # ["7+5=2", "2*3=6", "6-9=7", "Answer: 7"]
    write_solution(p, rng, error_rate=0.3)        # the same with injected step errors (a wrong result propagates)
    verify_answer(p.prompt, "7+5=2\n2*3=6\n6-9=7\nAnswer: 7\n")     # True (the prompt or the Problem)
    verify_steps(p, ["7+5=2", "2*3=5", "5-9=6", "Answer: 6"])          # [1, -1, -1, -1]

Format (one step per line; the step separator is the contract's "\\n", so a solution's text is
`alignloop.data.join_steps(steps)`): the prompt is "Q: <expression>[ mod m]\\n", the operations applied left to
right (7+5*3 is (7+5)*3); one step per operation, "<left><op><operand>=<result>", then a last step "Answer: <n>".

Two number ranges:
  digits mod 10 (`modulus=10`, the demo's default): the start 1..9, adding or subtracting 1..9 or multiplying by
            2..9, every result taken mod 10, so every number is one digit and a step is one of 300 facts: what a
            4-layer model learns exactly in a few minutes, so that its step errors are the ones it learned to make
            (below), and a verifier can learn to check a step. (Measured with integers, below: the base model
            itself got a third of its steps wrong, and its PRM, no better at arithmetic than it, learned a weak
            signal that best-of-N over-optimised: solve rate fell from 0.42 at N=1 to 0.05 at N=64.)
  integers (`modulus=None`): the start 2..20, adding or subtracting 1..9 or multiplying by 2 or 3, every true
            running value in 0..99 (a wrong step can leave that range; nothing breaks).
Digits are read one at a time (the demo's tokenizer splits numbers into digits).

Step errors (`write_solution`, per operation step with probability `error_rate`), the kinds a model trained on such
solutions learns to make (integers: carry, off, random, recovered; digits: operation, off, random, recovered):
  carry     the carry or borrow forgotten: 38+5=33, 41-3=48, a product off by 10 (a systematic error: the same wrong
            answer each time, which majority voting cannot out-vote when it is frequent); mod 10, the wrap forgotten
  operation the wrong operation: 7+5=5 (7*5 mod 10), 7*3=0 (7+3 mod 10): systematic too
  off       off by one or two
  random    any other number
  recovered a wrong result written down but the correct value carried on in the next step (the final answer is still
            right: "right by luck after a wrong step", which makes outcome labels noisy for judging the process)
The wrong result propagates: the next step starts from the number written (except `recovered`).

Step labels (`verify_steps`), PRM800K's first-error convention: a step is good (+1) when its arithmetic is right,
it uses the previous step's result (the problem's start for the first), and it applies the problem's next operation
(the last step: "Answer: n" with n the previous result); once a step is bad (−1), every step after it is bad too,
whatever it says (PRM800K's labelers stop at the first mistake; its steps after the first error are bad by
construction here, so a PRM learns "no error so far"). Steps beyond the problem's are bad.

Final answer (`verify_answer`): the first step of the form "Answer: n"; right when n is the problem's answer
(a solution right by luck after a wrong step counts as solved, as a final-answer grader sees it).

Simulated step labelers (`simulate_step_labels`): careful ones read each step and misjudge it with a small
probability (a missed error or a false alarm), marking everything after their first "bad" as bad (the app's "first
error" shortcut); the careless one rarely looks (all good with probability 0.6, else random). `gold_scores` /
`gold_step_scores` are the demo's hidden gold scorers (final answer right; each step good).
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from alignloop.data import join_steps, split_steps
from alignloop.errors import UserError

OPS = ("+", "-", "*")
MAX_VALUE = 99
START, ADD, SUB, MUL = (2, 20), (1, 9), (1, 9), (2, 3)     # the start's and the operands' ranges (inclusive)
PROMPT_PREFIX = "Q: "
ANSWER_PREFIX = "Answer: "
ERROR_KINDS = ("carry", "operation", "off", "random", "recovered")
DEFAULT_ERROR_WEIGHTS = {"carry": 0.4, "off": 0.3, "random": 0.15, "recovered": 0.15}
MOD_ERROR_WEIGHTS = {"operation": 0.35, "off": 0.3, "random": 0.2, "recovered": 0.15}   # digit problems (mod 10)
WRONG_OP = {"+": "*", "*": "+", "-": "+"}

_STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER = re.compile(r"^\s*Answer:\s*(-?\d+)\s*$")
_PROMPT = re.compile(r"^\s*Q:\s*(\d+)((?:\s*[+\-*]\s*\d+)+)(?:\s+mod\s+(\d+))?\s*$")
_TERM = re.compile(r"([+\-*])\s*(\d+)")


def apply(a: int, op: str, b: int, modulus: int | None = None) -> int:
    v = a + b if op == "+" else a - b if op == "-" else a * b
    return v % modulus if modulus else v


@dataclass(frozen=True)
class Problem:
    """start, then ops applied left to right: ((op, operand), ...); every result mod `modulus` when given."""
    start: int
    ops: tuple[tuple[str, int], ...]
    modulus: int | None = None

    @property
    def expression(self) -> str:
        return str(self.start) + "".join(f"{op}{b}" for op, b in self.ops)

    @property
    def prompt(self) -> str:
        mod = f" mod {self.modulus}" if self.modulus else ""
        return f"{PROMPT_PREFIX}{self.expression}{mod}\n"

    def values(self) -> list[int]:
        """The running value after each operation (the true intermediate results)."""
        out, v = [], self.start
        for op, b in self.ops:
            v = apply(v, op, b, self.modulus)
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def steps(self) -> list[str]:
        """The correct solution, one step per operation and the answer step."""
        return write_solution(self, random.Random(0), error_rate=0.0)

    def solution(self) -> str:
        return join_steps(self.steps())


def parse_problem(problem: Problem | str) -> Problem:
    """A Problem, or its prompt text ("Q: 7+5*3+2\\n", "Q: 7+5*3+2 mod 10\\n") parsed. A prompt that is not one
    raises UserError."""
    if isinstance(problem, Problem):
        return problem
    m = _PROMPT.match(str(problem))
    if not m:
        raise UserError(f"not an arithmetic prompt (expected 'Q: 7+5*3+2'): {str(problem)[:60]!r}")
    return Problem(int(m.group(1)), tuple((op, int(b)) for op, b in _TERM.findall(m.group(2))),
                   int(m.group(3)) if m.group(3) else None)


def random_problem(rng: random.Random, min_ops: int = 2, max_ops: int = 4, modulus: int | None = None) -> Problem:
    """2..4 operations (uniform), each drawn among those that keep the running value in 0..99; with a modulus m,
    digits: the start in 1..m-1, adding or subtracting 1..m-1, multiplying by 2..m-1, every result mod m."""
    if modulus:
        ops = []
        for _ in range(rng.randint(min_ops, max_ops)):
            op = rng.choice(OPS)
            ops.append((op, rng.randint(2 if op == "*" else 1, modulus - 1)))
        return Problem(rng.randint(1, modulus - 1), tuple(ops), modulus)
    v = rng.randint(*START)
    start, ops = v, []
    for _ in range(rng.randint(min_ops, max_ops)):
        choices = [("+", b) for b in range(ADD[0], ADD[1] + 1) if v + b <= MAX_VALUE]
        choices += [("-", b) for b in range(SUB[0], SUB[1] + 1) if v - b >= 0]
        choices += [("*", b) for b in range(MUL[0], MUL[1] + 1) if v * b <= MAX_VALUE]
        # each operation equally likely, then its operand
        by_op = {o: [c for c in choices if c[0] == o] for o in OPS}
        op = rng.choice([o for o in OPS if by_op[o]])
        c = rng.choice(by_op[op])
        ops.append(c)
        v = apply(v, *c)
    return Problem(start, tuple(ops))


def problems(n: int, seed: int = 0, exclude: set[str] | None = None, min_ops: int = 2,
             max_ops: int = 4, modulus: int | None = None) -> list[Problem]:
    """n distinct problems (by expression), none of whose expression is in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        p = random_problem(rng, min_ops, max_ops, modulus)
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems")
        if p.expression in seen:
            continue
        seen.add(p.expression)
        out.append(p)
    return out


def wrong_result(a: int, op: str, b: int, kind: str, rng: random.Random, modulus: int | None = None) -> int:
    """A wrong result of a<op>b of the given kind (never the right one, never negative; with a modulus, a residue)."""
    right = apply(a, op, b, modulus)
    if modulus:
        if kind == "operation":
            cand = apply(a, WRONG_OP[op], b, modulus)
        elif kind == "carry":      # the wrap forgotten (7+5=12), else off by one
            cand = apply(a, op, b) if apply(a, op, b) >= modulus else (right + 1) % modulus
        elif kind in ("off", "recovered"):
            cand = (right + rng.choice([-2, -1, 1, 2])) % modulus
        elif kind == "random":
            cand = rng.randint(0, modulus - 1)
        else:
            raise ValueError(f"unknown error kind {kind!r}; one of {ERROR_KINDS}")
        return cand if cand != right else (right + 1) % modulus
    if kind == "operation":
        cand = apply(a, WRONG_OP[op], b)
    elif kind == "carry":
        if op == "+" and (a % 10) + (b % 10) >= 10:
            cand = right - 10
        elif op == "-" and (a % 10) < (b % 10):
            cand = right + 10
        elif op == "*" and right >= 10:
            cand = right + (10 if (a + b) % 2 else -10)
        else:
            cand = right + (1 if (a + b) % 2 else -1)
    elif kind in ("off", "recovered"):
        cand = right + rng.choice([-2, -1, 1, 2])
    elif kind == "random":
        cand = rng.randint(0, MAX_VALUE)
    else:
        raise ValueError(f"unknown error kind {kind!r}; one of {ERROR_KINDS}")
    if cand < 0 or cand == right:
        cand = right + 1
    return cand


def write_solution(problem: Problem, rng: random.Random, error_rate: float = 0.0,
                   error_weights: dict[str, float] | None = None) -> list[str]:
    """The steps of a solution in which each operation step is wrong with probability `error_rate` (kinds drawn by
    `error_weights`, default DEFAULT_ERROR_WEIGHTS); a wrong result propagates (the next step starts from it) except
    for the `recovered` kind. The answer step states the last written result."""
    weights = error_weights or (MOD_ERROR_WEIGHTS if problem.modulus else DEFAULT_ERROR_WEIGHTS)
    kinds, w = list(weights), list(weights.values())
    steps, v = [], problem.start
    for op, b in problem.ops:
        right = apply(v, op, b, problem.modulus)
        if error_rate > 0 and rng.random() < error_rate:
            kind = rng.choices(kinds, w)[0]
            written = wrong_result(v, op, b, kind, rng, problem.modulus)
            carried = right if kind == "recovered" else written
        else:
            written = carried = right
        steps.append(f"{v}{op}{b}={written}")
        v = carried
    steps.append(f"{ANSWER_PREFIX}{v}")
    return steps


def final_answer(solution: str | Sequence[str]) -> int | None:
    """The number of the first "Answer: n" step (None when there is none)."""
    steps = split_steps(solution) if isinstance(solution, str) else solution
    for s in steps:
        m = _ANSWER.match(s)
        if m:
            return int(m.group(1))
    return None


def verify_answer(problem: Problem | str, solution_text: str) -> bool:
    """Whether the solution's final answer (its first "Answer: n" step) is the problem's answer. `problem`: a
    Problem or its prompt. The (prompt, solution_text) -> bool verifier of Math-Shepherd labels."""
    return final_answer(solution_text) == parse_problem(problem).answer


def local_checks(problem: Problem | str, steps: Sequence[str]) -> list[bool]:
    """Each step on its own: an operation step "a<op>b=r" is right when a is the previous step's written result (the
    start for the first), (op, b) is the problem's next operation and r = a<op>b; the step after the last operation
    is right when it is "Answer: n" with n the previous result. Steps beyond those, or unreadable ones, are wrong."""
    p = parse_problem(problem)
    out, prev = [], p.start
    for i, s in enumerate(steps):
        if i < len(p.ops):
            m = _STEP.match(s)
            if not m:
                out.append(False)
                prev = None
                continue
            a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            out.append(a == prev and (op, b) == p.ops[i] and r == apply(a, op, b, p.modulus))
            prev = r
        elif i == len(p.ops):
            m = _ANSWER.match(s)
            out.append(bool(m) and prev is not None and int(m.group(1)) == prev)
        else:
            out.append(False)
    return out


def first_error(problem: Problem | str, steps: Sequence[str]) -> int | None:
    """Index of the first wrong step (`local_checks`); None when every step is right."""
    for i, ok in enumerate(local_checks(problem, steps)):
        if not ok:
            return i
    return None


def verify_steps(problem: Problem | str, steps: Sequence[str]) -> list[int]:
    """+1 / −1 per step, PRM800K's first-error convention: +1 up to the first wrong step (`local_checks`), −1 from
    it on (see the module docstring)."""
    k = first_error(problem, steps)
    return [1 if k is None or i < k else -1 for i in range(len(steps))]


def is_complete(problem: Problem | str, steps: Sequence[str]) -> bool:
    """Whether every step is right and the solution ends with the answer step."""
    p = parse_problem(problem)
    return len(steps) == len(p.ops) + 1 and first_error(p, steps) is None


# ---------------------------------------------------------------------------------------------------- gold scorers
def gold_scores(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The demo's hidden outcome scorer (module:function): 1.0 when the final answer is right, else 0.0."""
    return [float(verify_answer(p, c)) for p, c in zip(prompts, completions, strict=True)]


def gold_step_scores(prompts: Sequence[str], step_lists: Sequence[Sequence[str]]) -> list[list[float]]:
    """The demo's hidden process scorer: per step 1.0 when good (`verify_steps`), else 0.0 (a rule-based step
    verifier for `alignloop.scoring.ProcessScorer`)."""
    return [[1.0 if lab > 0 else 0.0 for lab in verify_steps(p, s)]
            for p, s in zip(prompts, step_lists, strict=True)]


# ------------------------------------------------------------------------------------------ simulated step labelers
@dataclass
class StepLabeler:
    """A simulated step labeler. Careful: misses a wrong step with probability `miss`, calls a right step wrong with
    probability `false_alarm`, and marks every step after its first "bad" as bad (first-error shortcut). Careless:
    with probability `lazy` marks every step good without reading, else labels each step at random."""
    name: str
    miss: float = 0.1
    false_alarm: float = 0.03
    careless: bool = False
    lazy: float = 0.6


def default_step_labelers(n_careful: int = 2) -> list[StepLabeler]:
    misses = [0.08, 0.15, 0.1, 0.12]
    alarms = [0.02, 0.04, 0.03, 0.05]
    out = [StepLabeler(f"checker{i + 1}", miss=misses[i % 4], false_alarm=alarms[i % 4]) for i in range(n_careful)]
    return out + [StepLabeler("careless", careless=True)]


def label_steps(lab: StepLabeler, problem: Problem | str, steps: Sequence[str], rng: random.Random) -> list[int]:
    """One labeler's +1/−1 labels of one solution (see StepLabeler)."""
    if lab.careless:
        if rng.random() < lab.lazy:
            return [1] * len(steps)
        return [rng.choice([1, -1]) for _ in steps]
    ok = local_checks(problem, steps)
    out: list[int] = []
    for good in ok:
        if out and out[-1] == -1:
            out.append(-1)
            continue
        seen_good = (rng.random() >= lab.false_alarm) if good else (rng.random() < lab.miss)
        out.append(1 if seen_good else -1)
    return out


def simulate_step_labels(rows: Sequence[dict], labelers: Sequence[StepLabeler], seed: int = 0) -> list[dict]:
    """Every labeler labels every solution: one step-format row per (solution, labeler), {"prompt", "completions",
    "labels", "labeler"}. `rows`: {"prompt", "completions": [steps]} (a problem's prompt)."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        for lab in labelers:
            out.append({"prompt": r["prompt"], "completions": list(r["completions"]),
                        "labels": label_steps(lab, r["prompt"], r["completions"], rng), "labeler": lab.name})
    return out


def majority_step_labels(rows: Sequence[dict]) -> list[dict]:
    """One row per solution (prompt, steps) from several labelers' rows: each step's majority label (a tie → −1, the
    cautious call), `votes` the number of labelers. Order: first appearance."""
    groups: dict[tuple, list[list[int]]] = {}
    for r in rows:
        groups.setdefault((r["prompt"], tuple(r["completions"])), []).append([int(x) for x in r["labels"]])
    out = []
    for (prompt, steps), labs in groups.items():
        maj = [1 if sum(col) > 0 else -1 for col in zip(*labs, strict=True)]
        out.append({"prompt": prompt, "completions": list(steps), "labels": maj, "votes": len(labs)})
    return out


def labeler_step_accuracy(rows: Sequence[dict]) -> dict[str, float]:
    """Per labeler: the share of steps whose label equals `verify_steps` (the gold step labels)."""
    hit: dict[str, list[int]] = {}
    for r in rows:
        gold = verify_steps(r["prompt"], r["completions"])
        hit.setdefault(r.get("labeler", "?"), []).extend(int(int(a) == b) for a, b in zip(r["labels"], gold,
                                                                                             strict=True))
    return {w: sum(v) / len(v) for w, v in hit.items() if v}
