"""Reading the store: what a labeler sees of an item, judgement histories, progress, summaries and the judgements
that quality statistics and export work on. Functions take an open session (or connection); `Store` opens it.

Item views are cached per item (`ItemViewCache`): prompts and completions never change once imported, and an item
is shown to k labelers. The view is stored in canonical order and put into a labeler's shown order on the way out.
"""
from __future__ import annotations

from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.orm import Session

from .assignment import gold_seed, is_gold_turn
from .models import Assignment, Completion, Item, Judgement, Labeler, Project, Prompt

VIEW_CACHE_ITEMS = 4096  # items whose view is kept (oldest dropped first)

# (prompt head, completions in canonical order): ({"messages", "is_chat"}, [{"text", "model"}, ...])
ItemView = tuple[dict, list[dict]]

_Q_PROMPT = select(Prompt.messages, Prompt.is_chat).where(Prompt.id == bindparam("pid"))
_Q_COMPLETIONS = select(Completion.id, Completion.text, Completion.model).where(
    Completion.id.in_(bindparam("ids", expanding=True)))


class ItemViewCache:
    """item id -> ItemView, at most `max_items` (the oldest entry goes first)."""

    def __init__(self, max_items: int = VIEW_CACHE_ITEMS):
        self.max_items = max_items
        self._views: dict[int, ItemView] = {}

    def __contains__(self, item_id: int) -> bool:
        return item_id in self._views

    def get(self, item_id: int) -> ItemView | None:
        return self._views.get(item_id)

    def put(self, item_id: int, view: ItemView) -> None:
        if len(self._views) >= self.max_items:
            self._views.pop(next(iter(self._views)))
        self._views[item_id] = view


def load_item_view(conn: Connection, prompt_id: int, completion_ids: list[int]) -> ItemView:
    prompt = conn.execute(_Q_PROMPT, {"pid": prompt_id}).one()
    comps = {c.id: c for c in conn.execute(_Q_COMPLETIONS, {"ids": list(completion_ids)})}
    return ({"messages": prompt.messages, "is_chat": prompt.is_chat},
            [{"text": comps[cid].text, "model": comps[cid].model} for cid in completion_ids])


def in_shown_order(view: ItemView, shown_order: list[int]) -> dict:
    """What a labeler sees: `{"messages", "is_chat", "completions"}` with the completions in the shown order."""
    head, canon = view
    return {**head, "completions": [dict(canon[i]) for i in shown_order]}


def judgement_history(s: Session, assignment_id: int) -> list[Judgement]:
    return list(s.scalars(select(Judgement).where(Judgement.assignment_id == assignment_id)
                          .order_by(Judgement.version)))


def current_judgement(s: Session, assignment_id: int) -> Judgement | None:
    return s.scalar(select(Judgement).where(Judgement.assignment_id == assignment_id)
                    .order_by(Judgement.version.desc()).limit(1))


def latest_versions(labeler_id: int | None = None):
    """Subquery (assignment_id, v): the current (highest) version of each judged assignment."""
    q = select(Judgement.assignment_id, func.max(Judgement.version).label("v"))
    if labeler_id is not None:
        q = q.where(Judgement.labeler_id == labeler_id)
    return q.group_by(Judgement.assignment_id).subquery()


def labeler_history(s: Session, project_id: int, labeler_id: int, limit: int = 200) -> list[dict]:
    """The labeler's current judgements in the project, newest first: `{"judgement", "assignment"}`."""
    latest = latest_versions(labeler_id)
    rows = s.execute(select(Judgement, Assignment).join(
        latest, (Judgement.assignment_id == latest.c.assignment_id) & (Judgement.version == latest.c.v))
        .join(Assignment, Assignment.id == Judgement.assignment_id)
        .where(Assignment.project_id == project_id).order_by(Judgement.created_at.desc()).limit(limit)).all()
    return [{"judgement": j, "assignment": a} for j, a in rows]


FORECAST_TURNS = 1000  # the labeler's next assignments whose gold turns `progress` forecasts one by one


def forecast_turns(seed: str, labeler_id: int, i: int, gold_rate: float, normal: int, gold: int,
                   horizon: int = FORECAST_TURNS) -> int:
    """How many more assignments a labeler whose next one is their i-th will be given while `normal` non-gold and
    `gold` gold items are available to them, by the assignment rules (`assignment.next_in`): a gold turn
    (`is_gold_turn`) takes a gold item while there is one, any other turn a non-gold item; it ends at a turn that
    finds nothing. Turns past `horizon` are counted as one per non-gold item (gold ones not forecast)."""
    n = 0
    while n < horizon and gold:
        if is_gold_turn(seed, labeler_id, i + n, gold_rate):
            gold -= 1
        elif normal:
            normal -= 1
        else:
            return n
        n += 1
    return n + normal


def progress(s: Session, project_id: int, labeler_id: int) -> dict:
    """done / skipped / open assignments of the labeler, `remaining`: how many more items they will be given, gold
    items included, and `total` (done + open + remaining).

    `remaining` forecasts the labeler's gold turns (the seeded draw, `assignment.is_gold_turn`) over the non-gold
    items still available to them and the gold items they never had, so that taking an item leaves `open +
    remaining` as it was and submitting it lowers it by one, whether the item is gold or not: the counts never mark
    a gold item (before the forecast, "N left" stayed the same on every gold item). Other labelers taking items
    (and expiries) change it as before."""
    p = s.get(Project, project_id)
    counts = dict(s.execute(select(Assignment.status, func.count()).where(
        Assignment.labeler_id == labeler_id, Assignment.project_id == project_id)
        .group_by(Assignment.status)).all())
    mine = select(Assignment.item_id).where(Assignment.labeler_id == labeler_id).scalar_subquery()
    remaining = s.scalar(select(func.count()).select_from(Item).where(
        Item.project_id == project_id, Item.is_gold.is_(False), Item.n_active < p.overlap_k,
        Item.id.not_in(mine)))
    if p.gold_rate > 0:
        gold = s.scalar(select(func.count()).select_from(Item).where(
            Item.project_id == project_id, Item.is_gold.is_(True), Item.id.not_in(mine)))
        remaining = forecast_turns(gold_seed(p), labeler_id, sum(counts.values()), p.gold_rate, remaining, gold)
    done = counts.get("done", 0)
    return {"done": done, "skipped": counts.get("skipped", 0), "open": counts.get("assigned", 0),
            "remaining": remaining, "total": done + counts.get("assigned", 0) + remaining}


def project_summary(s: Session, project_id: int) -> dict:
    p = s.get(Project, project_id)

    def count_items(*cond) -> int:
        return s.scalar(select(func.count()).select_from(Item).where(Item.project_id == project_id, *cond))

    by_kind = dict(s.execute(select(Labeler.kind, func.count()).select_from(Judgement).join(
        Assignment, Assignment.id == Judgement.assignment_id).join(Labeler, Labeler.id == Judgement.labeler_id)
        .where(Assignment.project_id == project_id).group_by(Labeler.kind)).all())
    return {"items": count_items(Item.is_gold.is_(False)), "gold_items": count_items(Item.is_gold.is_(True)),
            "complete_items": count_items(Item.is_gold.is_(False), Item.n_done >= p.overlap_k),
            "judgement_rows": sum(by_kind.values()), "ai_judgement_rows": by_kind.get("ai", 0)}


def current_judgements(s: Session, project_id: int) -> list[dict]:
    """The current (latest-version) judgement of every done assignment in the project, as plain dicts: the item
    (`item_id`, `prompt_id`, `completion_ids`, `is_gold`, `gold_answer`), the labeler (`labeler`: the username,
    `labeler_id`, `labeler_kind` "human" | "ai", `labeler_model`: an AI labeler's model, else None,
    `labeler_public_id`: the pseudonymous id exports use, `labeler_attributes`) and the judgement in canonical terms
    (`version`, `shown_order`, `choice`, `strength`, `picked_position`, `ranking`, `thumbs`, `likert`, `step_labels`,
    `flags`, `comment`, `time_spent_ms`, `details`: an AI judgement's evidence, else None, `answers`: a
    several-question judgement's answers, else None)."""
    latest = latest_versions()
    rows = s.execute(select(Judgement, Labeler, Item).join(
        latest, (Judgement.assignment_id == latest.c.assignment_id) & (Judgement.version == latest.c.v))
        .join(Assignment, Assignment.id == Judgement.assignment_id)
        .join(Labeler, Labeler.id == Judgement.labeler_id)
        .join(Item, Item.id == Judgement.item_id)
        .where(Assignment.project_id == project_id).order_by(Judgement.id)).all()
    return [{"item_id": item.id, "prompt_id": item.prompt_id, "completion_ids": item.completion_ids,
             "is_gold": item.is_gold, "gold_answer": item.gold_answer, "labeler": lab.username,
             "labeler_id": j.labeler_id, "labeler_kind": lab.kind, "labeler_model": lab.model,
             "labeler_public_id": lab.public_id, "labeler_attributes": dict(lab.attributes or {}),
             "version": j.version, "shown_order": j.shown_order, "choice": j.choice, "strength": j.strength,
             "picked_position": j.picked_position, "ranking": j.ranking, "thumbs": j.thumbs, "likert": j.likert,
             "step_labels": j.step_labels, "flags": j.flags, "comment": j.comment, "time_spent_ms": j.time_spent_ms,
             "details": j.details, "answers": j.answers}
            for j, lab, item in rows]


def prompts_and_completions(s: Session, project_id: int) -> tuple[dict[int, Prompt], dict[int, Completion]]:
    prompts = {p.id: p for p in s.scalars(select(Prompt).where(Prompt.project_id == project_id))}
    comps = {c.id: c for c in s.scalars(select(Completion).join(Prompt).where(Prompt.project_id == project_id))}
    return prompts, comps
