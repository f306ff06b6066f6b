"""Turn judgements into the datasets the trainers read (TRL formats).

* preference: `{"prompt", "chosen", "rejected", "margin", "pair_weight", "group"}` from pairwise judgements (margin
  from strength through the data contract, `alignloop.data.strength_to_margin`: Llama 2's small-margin table,
  significantly_better 1.0, better 2/3, slightly_better 1/3, negligibly_better 0.0) or from rankings (every pair with
  different ranks; margin 0.0). `group` and `pair_weight` are the data contract's (`groups_to_rows`): rows of one
  group are adjacent and read back as one batch element (kept on one side of a held-out split). Pairwise: a group per
  prompt, each row weighted 1/(the prompt's rows), so a prompt counts once however many of its pairs were labeled
  (like a ranking's 1/C(K,2)); rank: a group per ranking, each pair 1/C(K,2), as the ranking row reads.
* ranking: `{"prompt", "completions", "ranking"}` (rank 1 = best, ties share a rank).
* unpaired: `{"prompt", "completion", "label"}` (bool): thumbs; Likert >= `likert_threshold`; pairwise chosen True /
  rejected False; rank first True / last False.
* steps (a steps project's only format, and only a steps project's): `{"prompt", "completions": [steps], "labels":
  [+1 | 0 | -1 per step]}`, the step format `alignloop.data.read_steps` reads (one row per solution). Consensus: per
  step, the majority label of the kept labelers, a tie at the top -> 0 (neutral: the labelers disagree whether
  the step is right); or Dawid-Skene over steps. `mode` all: one row per current judgement (per labeler).

A plain-string prompt is written as a string and completions as strings; a multi-turn (messages) prompt is written in
TRL's conversational form: `prompt` a list of messages, each completion `[{"role": "assistant", "content": ...}]`.

Options (`ExportOptions`): `mode` consensus (one record per item, from the labels of unflagged labelers) or all (one
record per current judgement); `consensus` majority | dawid_skene; `ties` drop | both (a tie becomes both orders with
margin 0, which is a 1/2 target for Bradley-Terry in expectation; a rank project's ranking rows keep partial ties as
equal ranks whatever this option, and drop rankings where everything is tied; a pairwise tie in ranking format is
`[1, 1]` with ties=both); `both_bad` drop | tie (treat as a tie); `exclude_flagged` (labelers flagged by the quality
thresholds); `include_gold` (gold items are for quality control and left out by default); `labelers` all | human |
ai: whose judgements are exported (people and AI labelers mixed by default; the consensus, the flagging and the
summary's counts then see only those labelers' judgements); `criterion` (below).

Labeler context (`export_meta`): a row of mode all carries its judgement's `labeler` (pseudonymous), its
`labeler_attributes`, `comment`, `flags` and `time_spent_ms`; a consensus row `labelers`, `comments`, `flags` (and
`labeler_attributes` when all of them agree). Steps rows carry none (the step format takes no extra columns).
In mode all a pairwise project's preference groups are per prompt *and labeler*, so a group's rows share their
labeler; `pair_weight` stays 1/(the prompt's rows), as in consensus.

Several questions (`questions.py`): `criterion` exports one question's answers (default: the first), or "all"
(every question's rows in one file, each criterion's groups apart). When the project names its questions (its
`questions` setting), every row carries its `criterion` (the question's name); a project without the setting
writes none.

Demonstration and conversation projects export their own formats (`PROMPT_TASK_FORMATS`: sft, messages, preference)
through `export_prompt_task`: `demonstrations.export_demonstration_rows` (review filter `review`) and
`conversations.export_conversation_rows`; the options above are for judgements of completions and do not apply.

The rows are exactly what `alignloop.data.load_preferences` / `load_records` read back (tested); write them with
`alignloop.data.write_rows` (format from the suffix, written aside and renamed into place). A steps row's prompt is
a string or the list of messages, and its steps are strings in either case (the step format).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from statistics import mean, median
from typing import Any

from alignloop.data import ranking_pair_weight, strength_to_margin
from alignloop.errors import UserError

from . import conversations, demonstrations, export_meta, quality, questions
from .projects import default_min_labels

FORMATS = ("preference", "ranking", "unpaired", "steps")
PROMPT_TASKS = ("demonstration", "conversation")  # projects whose labelers write (demonstrations) or converse
PROMPT_TASK_FORMATS = ("sft", "messages", "preference")
LABELER_CHOICES = ("all", "human", "ai")  # ExportOptions.labelers: everyone, people only, AI labelers only


@dataclass
class ExportOptions:
    format: str = "preference"
    mode: str = "consensus"            # consensus | all
    consensus: str = "majority"        # majority | dawid_skene
    ties: str = "drop"                 # drop | both
    both_bad: str = "drop"             # drop | tie
    exclude_flagged: bool = True
    include_gold: bool = False
    likert_threshold: int = 5
    labelers: str = "all"              # all | human | ai: whose judgements are exported
    criterion: str | None = None       # a question's name, "all", or None: the first question
    min_labels: int | None = None      # consensus needs this many kept labels per item (None: the project's setting)
    thresholds: quality.Thresholds = field(default_factory=quality.Thresholds)

    def check(self) -> None:
        for name, allowed in (("format", FORMATS), ("mode", ("consensus", "all")),
                              ("consensus", ("majority", "dawid_skene")), ("ties", ("drop", "both")),
                              ("both_bad", ("drop", "tie")), ("labelers", LABELER_CHOICES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"export {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if not 1 <= self.likert_threshold <= 7:
            raise UserError("likert threshold must be 1..7")
        if self.min_labels is not None and (isinstance(self.min_labels, bool) or not isinstance(self.min_labels, int)
                                            or not 1 <= self.min_labels <= 100):
            raise UserError(f"export min_labels {self.min_labels!r}: a whole number from 1 to 100")


def default_format(task_type: str) -> str:
    """A project's export format when none is asked for: steps for steps, unpaired for thumbs and Likert (their
    only format), preference for pairwise and rank."""
    return {"steps": "steps", "thumbs": "unpaired", "likert": "unpaired", "demonstration": "sft"}.get(
        task_type, "preference")


def export_prompt_task(store, p, format: str, review: str = "not_rejected") -> tuple[list[dict], dict]:
    """A demonstration or conversation project's rows in `format` (PROMPT_TASK_FORMATS): (rows, summary). A
    demonstration's `review` filter: not_rejected | accepted | all (`demonstrations.EXPORT_REVIEWS`)."""
    if p.task_type not in PROMPT_TASKS:
        raise UserError(f"project {p.name!r} is a {p.task_type} project: export it as {', '.join(FORMATS)}")
    if format not in PROMPT_TASK_FORMATS:
        raise UserError(f"a {p.task_type} project exports {', '.join(PROMPT_TASK_FORMATS)} (got {format!r})")
    if p.task_type == "demonstration":
        if review not in demonstrations.EXPORT_REVIEWS:
            raise UserError(f"export review {review!r}: choose one of {', '.join(demonstrations.EXPORT_REVIEWS)}")
        return demonstrations.export_demonstration_rows(store, p.id, format, review)
    return conversations.export_conversation_rows(store, p.id, format)


def prompt_task_empty_message(p, summary: dict) -> str:
    """Why a demonstration or conversation export came out empty, in words."""
    if p.task_type == "demonstration":
        return demonstrations.empty_message(summary)
    counts = ", ".join(f"{k} {v}" for k, v in summary.items() if isinstance(v, int | float | dict) and v != {})
    return f"0 rows exported from the conversations ({counts or 'none yet'})"


def project_options(p, **options) -> ExportOptions:
    """ExportOptions with the project's own quality thresholds (its `thresholds` setting) for flagging labelers."""
    return ExportOptions(**options, thresholds=quality.thresholds_from_dict(p.settings.get("thresholds")))


def margin_of(strength: str | None) -> float:
    """The margin of a pairwise strength (the data contract's table, `alignloop.data.strength_to_margin`); 0 for
    no strength (ties, both bad)."""
    return 0.0 if strength is None else strength_to_margin(strength)


class _Texts:
    """A project's prompts and completions as rows carry them: plain strings for a plain prompt; for a multi-turn
    prompt TRL's conversational form (the messages, and each completion as one assistant message)."""

    def __init__(self, prompts: dict, comps: dict):
        self.prompts, self.comps = prompts, comps

    def prompt(self, pid: int):
        pr = self.prompts[pid]
        return pr.messages if pr.is_chat else pr.messages[-1]["content"]

    def completion(self, pid: int, cid: int):
        t = self.comps[cid].text
        return [{"role": "assistant", "content": t}] if self.prompts[pid].is_chat else t


def export_records(store, project: str | int, opts: ExportOptions) -> tuple[list[dict], dict]:
    """Build the rows for one project. Returns (rows, summary)."""
    opts.check()
    p = store.get_project(project)
    if p.task_type in PROMPT_TASKS:
        raise UserError(f"a {p.task_type} project exports {', '.join(PROMPT_TASK_FORMATS)}: "
                        "export.export_prompt_task")
    if p.task_type in ("thumbs", "likert") and opts.format != "unpaired":
        raise UserError(f"a {p.task_type} project exports only the unpaired format (got {opts.format!r})")
    if (p.task_type == "steps") != (opts.format == "steps"):
        raise UserError(f"the steps format is a steps project's only format: project {p.name!r} is {p.task_type}, "
                        f"the format {opts.format!r}")
    criteria = _criteria(p, opts.criterion)
    every = store.current_judgements(p.id)
    records = [r for r in every if opts.labelers in ("all", quality.kind_of(r))]
    stats = quality.labeler_stats(records, p.task_type)  # flagging reads the first question (the columns)
    flagged = {w for w, r in quality.flag_labelers(stats, opts.thresholds).items() if r}
    kept = [r for r in records if (opts.include_gold or not r["is_gold"])
            and not (opts.exclude_flagged and r["labeler"] in flagged)]
    summary: dict[str, Any] = {"judgements": len(records), "used": len(kept), "flagged_labelers": sorted(flagged),
                               "labelers": opts.labelers, "other_labelers_judgements": len(every) - len(records),
                               "criteria": criteria, "dropped": Counter()}
    kept, review = _adjudicated(p, kept, store.adjudications(p.id), opts, summary)
    texts = _Texts(*store.prompts_and_completions(p.id))
    first, rows = questions.names_of(p.settings)[0], []
    overridden = {a["item_id"] for a in review.overrides}
    for name in criteria:
        # an override answers the first question: there it replaces the item's votes; the other questions'
        # exports keep the votes (README "Review decisions")
        if name == first:
            crit_kept, crit_review = [r for r in kept if r["item_id"] not in overridden], review
        else:
            crit_kept, crit_review = kept, _Review(review.min_labels, review.accepted, [])
        voted = _criterion_rows(p.task_type, texts, questions.criterion_records(crit_kept, name, first), opts,
                                summary["dropped"], crit_review)
        if questions.is_named(p.settings) and p.task_type != "steps":
            voted = [(item, [{**r, "criterion": name} for r in item_rows]) for item, item_rows in voted]
        if opts.format == "preference":  # each criterion's groups apart, numbered on from the previous ones
            rows += _grouped_pairs(p.task_type, voted, first_group=1 + max((r["group"] for r in rows), default=-1))
        else:
            rows += [r for _, item_rows in voted for r in item_rows]
    summary["rows"] = len(rows)
    summary["dropped"] = dict(summary["dropped"])
    return rows, summary


@dataclass
class _Review:
    """What the admins' review changes in a criterion's export: the consensus's label minimum, the items accepted
    (exported below it) and the overrides (their newest adjudication: the answer replaces the votes)."""
    min_labels: int
    accepted: set[int]
    overrides: list[dict]


def _adjudicated(p, kept: list[dict], adjs: dict[int, dict], opts: ExportOptions,
                 summary: dict) -> tuple[list[dict], _Review]:
    """`kept` without the judgements of excluded items (the newest adjudication of each item, `review.py`), and
    the _Review for the criteria's rows (the overrides: the caller leaves out the overridden items' votes where the
    override answers, the first question); the counts go into `summary`.

    An override is an admin's answer, neither a person's label among the labelers' nor an AI labeler's: it applies
    to the exports of every labeler (`labelers` all) only. An export of one kind (`labelers` human | ai) keeps those
    labelers' own votes on an overridden item (counted as `overrides_not_applied`); exclude and accept are decisions
    about the item and apply to every export."""
    adjs = {i: a for i, a in adjs.items() if opts.include_gold or not a["is_gold"]}
    gone = {i for i, a in adjs.items() if a["decision"] == "exclude"}
    min_labels = opts.min_labels if opts.min_labels is not None else int(
        p.settings.get("min_labels", default_min_labels(p.overlap_k)))
    summary.update({"min_labels": min_labels,
                    "excluded_items": sum(1 for a in adjs.values() if a["decision"] == "exclude"),
                    "overridden_items": sum(1 for a in adjs.values() if a["decision"] == "override"),
                    "accepted_items": sum(1 for a in adjs.values() if a["decision"] == "accept"),
                    "overrides_not_applied": 0})
    accepted = {i for i, a in adjs.items() if a["decision"] == "accept"}
    overrides = [a for a in adjs.values() if a["decision"] == "override"]
    if opts.labelers != "all":
        summary["overrides_not_applied"], summary["overridden_items"] = summary["overridden_items"], 0
        overrides = []
    return [r for r in kept if r["item_id"] not in gone], _Review(min_labels, accepted, overrides)


def _override_vote(task_type: str, a: dict, mode: str) -> tuple[dict, dict, dict]:
    """(item record, vote, labeler columns) of an overridden item: the admin's answer, named by the admin's
    export id, the note as its comment."""
    vote = dict(a["answer"] or {})
    if task_type == "pairwise":
        vote["margin"] = margin_of(vote.get("strength"))
    if mode == "all":
        meta = {"labeler": a["admin_public_id"], "labeler_attributes": a["admin_attributes"], "comment": a["note"],
                "flags": []}
    else:
        meta = {"labelers": [a["admin_public_id"]], "comments": [a["note"]], "flags": [],
                "labeler_attributes": a["admin_attributes"]}
    return a, vote, meta


def empty_message(summary: dict) -> str:
    """Why an export came out empty, in words (the CLI refuses to write it without --allow-empty; the web says so)."""
    why = []
    if summary["judgements"] == 0:
        why.append("the project has no judgements (of the labelers asked for)")
    elif summary["used"] == 0:
        why.append(f"none of the {summary['judgements']} judgements was kept"
                   + (f" (flagged labelers left out: {', '.join(map(str, summary['flagged_labelers']))})"
                      if summary["flagged_labelers"] else " (gold items are left out by default)"))
    dropped = summary.get("dropped") or {}
    if dropped.get("too_few_labels"):
        why.append(f"{dropped['too_few_labels']} items have fewer than min_labels = {summary['min_labels']} labels")
    for reason in ("no_consensus", "tie", "both_bad"):
        if dropped.get(reason):
            why.append(f"{dropped[reason]} dropped: {reason.replace('_', ' ')}")
    if summary.get("excluded_items"):
        why.append(f"{summary['excluded_items']} items excluded by review")
    return "0 rows exported: " + ("; ".join(why) or "nothing to export")


def _criteria(p, criterion: str | None) -> list[str]:
    """The question names to export: the first (None), every one ("all") or the one named."""
    names = list(questions.names_of(p.settings))
    if criterion is None:
        return names[:1]
    if criterion == "all":
        return names
    if criterion not in names:
        raise UserError(f"criterion {criterion!r}: project {p.name!r} asks {', '.join(names)} (or give all)")
    return [criterion]


def _criterion_rows(task_type: str, texts: _Texts, kept: list[dict], opts: ExportOptions,
                    dropped: Counter, review: _Review) -> list[tuple[dict, list[dict]]]:
    """(item record, its rows) per vote: one per judgement (mode all) or per item (consensus: items with fewer
    than `min_labels` kept labels are left out unless accepted by review), each row with the labeler context of its
    vote (`export_meta`; a steps row has none: the step format takes no extra columns); an overridden item's one
    vote is the admin's answer."""
    if opts.mode == "all":  # per item: the labels to turn into rows ("votes"); consensus collapses them to one
        votes = [(r, r, export_meta.judgement_meta(r)) for r in kept]
    else:
        by_item: dict[int, list[dict]] = defaultdict(list)
        for r in kept:
            by_item[r["item_id"]].append(r)
        for item_id in [i for i, rs in by_item.items() if len(rs) < review.min_labels and i not in review.accepted]:
            dropped["too_few_labels"] += 1
            del by_item[item_id]
        votes = [(item, v, export_meta.consensus_meta(by_item[item["item_id"]]))
                 for item, v in _consensus_votes(task_type, by_item, opts, dropped)]
    if review.overrides:  # in item order with the others (the consensus votes are in item order)
        votes = sorted(votes + [_override_vote(task_type, a, opts.mode) for a in review.overrides],
                       key=lambda vote: vote[0]["item_id"])
    rows_of = _ROWS[task_type]
    out = []
    for item, v, meta in votes:
        item_rows = rows_of(texts, item, v, opts, dropped)
        out.append((item, item_rows if task_type == "steps" else [{**r, **meta} for r in item_rows]))
    return out


def _grouped_pairs(task_type: str, voted: list[tuple[dict, list[dict]]], first_group: int = 0) -> list[dict]:
    """Preference rows with the data contract's `group` (numbered from `first_group`, rows of a group adjacent)
    and `pair_weight`: pairwise, one group per prompt (and per labeler in mode all: a group's rows then share
    their labeler), 1/(the prompt's rows) each; rank, one group per ranking, 1/C(K,2) each."""
    groups: dict[Any, list[dict]] = {}
    per_prompt: Counter = Counter()
    weights: dict[Any, float] = {}
    for n, (item, item_rows) in enumerate(voted):
        if not item_rows:
            continue
        if task_type == "pairwise":
            key = (item["prompt_id"], item_rows[0].get("labeler"))
            per_prompt[item["prompt_id"]] += len(item_rows)
        else:
            key = n
            weights[key] = ranking_pair_weight(len(item["completion_ids"]))
        groups.setdefault(key, []).extend(item_rows)
    out = []
    for g, (key, group_rows) in enumerate(groups.items(), start=first_group):
        w = weights[key] if task_type != "pairwise" else 1.0 / per_prompt[key[0]]
        out += [{**r, "pair_weight": w, "group": g} for r in group_rows]
    return out


# Rows of one vote per task type: (texts, item record, vote, options, dropped counter) -> rows

def _both_orders(prompt, a, b) -> list[dict]:
    """A tie as preference rows: both orders with margin 0 (a 1/2 target for Bradley-Terry in expectation)."""
    return [{"prompt": prompt, "chosen": a, "rejected": b, "margin": 0.0},
            {"prompt": prompt, "chosen": b, "rejected": a, "margin": 0.0}]


def _pairwise_tie_rows(t: _Texts, item: dict, opts: ExportOptions, dropped: Counter) -> list[dict]:
    pid, cids = item["prompt_id"], item["completion_ids"]
    if opts.ties == "drop" and opts.format != "unpaired":
        dropped["tie"] += 1
        return []
    if opts.format == "preference":
        return _both_orders(t.prompt(pid), t.completion(pid, cids[0]), t.completion(pid, cids[1]))
    if opts.format == "ranking":
        return [{"prompt": t.prompt(pid), "completions": [t.completion(pid, c) for c in cids], "ranking": [1, 1]}]
    dropped["tie"] += 1
    return []


def _pairwise_rows(t: _Texts, item: dict, v: dict, opts: ExportOptions, dropped: Counter) -> list[dict]:
    """A pairwise vote: choice a|b (with a margin or strength), tie or both_bad."""
    choice = v["choice"]
    if choice == "both_bad":
        if opts.both_bad == "drop":
            dropped["both_bad"] += 1
            return []
        choice = "tie"
    if choice == "tie":
        return _pairwise_tie_rows(t, item, opts, dropped)
    pid, cids = item["prompt_id"], item["completion_ids"]
    prompt = t.prompt(pid)
    win, lose = (cids[0], cids[1]) if choice == "a" else (cids[1], cids[0])
    if opts.format == "preference":
        margin = v["margin"] if "margin" in v else margin_of(v.get("strength"))
        return [{"prompt": prompt, "chosen": t.completion(pid, win), "rejected": t.completion(pid, lose),
                 "margin": float(margin)}]
    if opts.format == "ranking":
        return [{"prompt": prompt, "completions": [t.completion(pid, c) for c in cids],
                 "ranking": [1, 2] if choice == "a" else [2, 1]}]
    return [{"prompt": prompt, "completion": t.completion(pid, win), "label": True},
            {"prompt": prompt, "completion": t.completion(pid, lose), "label": False}]


def _rank_preference_rows(t: _Texts, pid: int, cids: list, ranking: list, opts: ExportOptions,
                          dropped: Counter) -> list[dict]:
    """Every pair with different ranks (margin 0); equal ranks: both orders with ties=both, else dropped."""
    prompt, rows = t.prompt(pid), []
    for i in range(len(cids)):
        for j in range(len(cids)):
            if ranking[i] < ranking[j]:
                rows.append({"prompt": prompt, "chosen": t.completion(pid, cids[i]),
                             "rejected": t.completion(pid, cids[j]), "margin": 0.0})
            elif ranking[i] == ranking[j] and i < j:
                if opts.ties == "both":
                    rows += _both_orders(prompt, t.completion(pid, cids[i]), t.completion(pid, cids[j]))
                else:
                    dropped["tie"] += 1
    return rows


def _rank_rows(t: _Texts, item: dict, v: dict, opts: ExportOptions, dropped: Counter) -> list[dict]:
    """A ranking vote: the ranking row (everything tied: dropped), its pairs, or its first (True) and last (False)."""
    pid, cids, ranking = item["prompt_id"], item["completion_ids"], v["ranking"]
    if opts.format == "preference":
        return _rank_preference_rows(t, pid, cids, ranking, opts, dropped)
    best, worst = min(ranking), max(ranking)
    if best == worst:  # everything tied: no information
        dropped["tie"] += 1
        return []
    if opts.format == "ranking":
        return [{"prompt": t.prompt(pid), "completions": [t.completion(pid, c) for c in cids], "ranking": ranking}]
    return [{"prompt": t.prompt(pid), "completion": t.completion(pid, c), "label": rk == best}
            for c, rk in zip(cids, ranking, strict=True) if rk in (best, worst)]


def _thumbs_rows(t: _Texts, item: dict, v: dict, opts: ExportOptions, dropped: Counter) -> list[dict]:
    pid = item["prompt_id"]
    return [{"prompt": t.prompt(pid), "completion": t.completion(pid, item["completion_ids"][0]),
             "label": bool(v["thumbs"] == 1)}]


def _likert_rows(t: _Texts, item: dict, v: dict, opts: ExportOptions, dropped: Counter) -> list[dict]:
    """Likert >= likert_threshold is a good label."""
    pid = item["prompt_id"]
    return [{"prompt": t.prompt(pid), "completion": t.completion(pid, item["completion_ids"][0]),
             "label": bool(v["likert"] >= opts.likert_threshold)}]


def _steps_rows(t: _Texts, item: dict, v: dict, opts: ExportOptions, dropped: Counter) -> list[dict]:
    """A solution and its label per step (the step format; steps are strings whatever the prompt's form)."""
    return [{"prompt": t.prompt(item["prompt_id"]), "completions": [t.comps[c].text for c in item["completion_ids"]],
             "labels": [int(x) for x in v["step_labels"]]}]


_ROWS = {"pairwise": _pairwise_rows, "rank": _rank_rows, "thumbs": _thumbs_rows, "likert": _likert_rows,
         "steps": _steps_rows}


def majority_step_labels(labels_per_labeler: list[list[int]]) -> list[int]:
    """Per step, the most common label; a tie at the top gives 0 (neutral).
    [[1, 1, -1], [1, -1, -1], [1, 0, 1]] -> [1, 0, -1]: step 2 ties 1 / -1 / 0, step 3 has two -1 of three."""
    out = []
    for votes in zip(*labels_per_labeler, strict=True):
        top = Counter(votes).most_common()
        out.append(top[0][0] if len(top) == 1 or top[0][1] > top[1][1] else 0)
    return out


def _steps_consensus(by_item: dict[int, list[dict]], opts: ExportOptions) -> list[tuple[dict, dict]]:
    """One vote per item: majority per step (ties -> 0) or Dawid-Skene over steps."""
    if opts.consensus == "dawid_skene":
        ann = quality.annotations_from_records("steps", [r for rs in by_item.values() for r in rs], gold=None)
        cons = quality.dawid_skene(ann).consensus
        return [(rs[0], {"step_labels": [cons[(item_id, i)] for i in range(len(rs[0]["completion_ids"]))]})
                for item_id, rs in sorted(by_item.items())]
    return [(rs[0], {"step_labels": majority_step_labels([r["step_labels"] for r in rs])})
            for _item_id, rs in sorted(by_item.items())]


def _consensus_votes(task_type: str, by_item: dict[int, list[dict]], opts: ExportOptions,
                     dropped: Counter) -> list[tuple[dict, dict]]:
    out = []
    if task_type == "steps":
        return _steps_consensus(by_item, opts)
    if task_type == "rank":
        for _item_id, rs in sorted(by_item.items()):
            k = len(rs[0]["ranking"])
            means = [mean(r["ranking"][i] for r in rs) for i in range(k)]
            out.append((rs[0], {"ranking": [1 + sum(1 for m in means if m < x) for x in means]}))
        return out
    if task_type == "likert":
        for _item_id, rs in sorted(by_item.items()):
            out.append((rs[0], {"likert": median(r["likert"] for r in rs)}))
        return out
    ann = {i: {r["labeler"]: quality.label_of(task_type, r) for r in rs} for i, rs in by_item.items()}
    if opts.consensus == "dawid_skene":
        cons = quality.dawid_skene(ann).consensus
    else:
        cons = quality.majority_vote(ann)
    for item_id, rs in sorted(by_item.items()):
        c = cons.get(item_id)
        if c is None:
            dropped["no_consensus"] += 1
            continue
        if task_type == "pairwise":
            agreeing = [margin_of(r["strength"]) for r in rs if r["choice"] == c]
            out.append((rs[0], {"choice": c, "margin": mean(agreeing) if agreeing else 0.0}))
        else:
            out.append((rs[0], {"thumbs": c}))
    return out
