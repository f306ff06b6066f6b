"""Who may label a project: everyone (the default, `settings["access"] == "all"`) or only its members
(`"members"`: rows of `project_members`, which admins manage on the project's Labelers page). Admins may label
every project.

`may_label` is what every place that shows a project to a labeler or hands them an item asks: the project list, the
labeling pages and the JSON API (a non-member gets 404, as for a project that does not exist), `Store.next_assignment`
and the SQLite hot path's next item after a submission (`may_label_sql`: nothing is handed out). Answers are cached
per (project, labeler) for ACCESS_TTL_S, like `ProjectInfo`; an admin's change in this process clears the cache
at once (`AccessCache.clear`), other processes see it within the TTL.
"""
from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from .errors import NotFound
from .models import Labeler, Project, ProjectMember

ACCESS_TTL_S = 5.0
ACCESS_CACHE_MAX = 100_000


class AccessCache:
    """(project id, labeler id) -> may label, each answer used for `ttl_s` seconds. One per store."""

    def __init__(self, ttl_s: float = ACCESS_TTL_S):
        self.ttl_s = ttl_s
        self._entries: dict[tuple[int, int], tuple[float, bool]] = {}
        self._cleared = -math.inf  # time.monotonic() of the last clear

    def get(self, project_id: int, labeler_id: int) -> bool | None:
        hit = self._entries.get((project_id, labeler_id))
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        return None

    def put(self, project_id: int, labeler_id: int, allowed: bool, read_at: float) -> bool:
        """Cache an answer read at `read_at` (time.monotonic() before the read), unless a clear came after that
        read began: the answer may predate an admin's change, so it is used once and not kept."""
        if read_at <= self._cleared:
            return allowed
        if len(self._entries) >= ACCESS_CACHE_MAX:  # bounded: drop the oldest entry (dicts keep insertion order)
            # another thread may have emptied or changed it meanwhile: then there is nothing to drop
            with contextlib.suppress(StopIteration, RuntimeError):
                self._entries.pop(next(iter(self._entries)), None)
        self._entries[(project_id, labeler_id)] = (time.monotonic(), allowed)
        return allowed

    def clear(self) -> None:
        """Forget every answer (an admin changed a project's access or its members; called after the COMMIT)."""
        self._cleared = time.monotonic()
        self._entries.clear()


def _decide(access: str | None, role: str | None, member: bool) -> bool:
    if role is None:  # no such labeler
        return False
    return role == "admin" or (access or "all") != "members" or member


def may_label(s: Session, project_id: int, labeler_id: int, cache: AccessCache) -> bool:
    """Whether the labeler may see and label the project (read through the ORM session `s` when not cached)."""
    hit = cache.get(project_id, labeler_id)
    if hit is not None:
        return hit
    read_at = time.monotonic()
    p = s.get(Project, project_id)
    if p is None:
        return False
    role = s.scalar(select(Labeler.role).where(Labeler.id == labeler_id))
    member = s.get(ProjectMember, (project_id, labeler_id)) is not None
    return cache.put(project_id, labeler_id, _decide((p.settings or {}).get("access"), role, member), read_at)


_SQL_ACCESS = ("SELECT p.settings, l.role, EXISTS (SELECT 1 FROM project_members m WHERE m.project_id = p.id "
               "AND m.labeler_id = l.id) FROM projects p, labelers l WHERE p.id = ? AND l.id = ?")


def may_label_sql(conn: sqlite3.Connection, project_id: int, labeler_id: int, cache: AccessCache) -> bool:
    """`may_label` on the SQLite hot path's own connection (inside its transaction)."""
    hit = cache.get(project_id, labeler_id)
    if hit is not None:
        return hit
    read_at = time.monotonic()
    row = conn.execute(_SQL_ACCESS, (project_id, labeler_id)).fetchone()
    if row is None:
        return False
    settings_json, role, member = row
    access = (json.loads(settings_json) if settings_json else {}).get("access")
    return cache.put(project_id, labeler_id, _decide(access, role, bool(member)), read_at)


def members_of(s: Session, project_id: int) -> set[int]:
    """The labeler ids of the project's members."""
    return set(s.scalars(select(ProjectMember.labeler_id).where(ProjectMember.project_id == project_id)))


def set_members(s: Session, project_id: int, labeler_ids: set[int]) -> None:
    """Make exactly `labeler_ids` the project's members (rows added and removed; existing ones keep their date)."""
    current = members_of(s, project_id)
    for lid in current - labeler_ids:
        s.delete(s.get(ProjectMember, (project_id, lid)))
    for lid in sorted(labeler_ids - current):
        s.add(ProjectMember(project_id=project_id, labeler_id=lid))


def check_may_label(store, project, user) -> None:
    """NotFound (404, like a project that does not exist) unless `user` may label `project` (`Store.may_label`).
    The labeling pages and the JSON API call it first thing after finding the project."""
    if not store.may_label(project.id, user.id):
        raise NotFound(f"no project {project.name!r}")
