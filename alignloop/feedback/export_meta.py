"""The labeler context an exported row carries (the data contract's optional columns of preference, ranking and
unpaired rows; `alignloop.data` reads them back):

* one row per judgement (mode all), `judgement_meta`: `labeler` (the labeler's pseudonymous `public_id`, e.g.
  "L3f9a2c41d07be815": random per store, never the username, not derived from the numeric id), `labeler_attributes`
  (what an admin set: {"group": "warm", ...}; {} when none), `comment` (str, "" when none), `flags` (list of str)
  and `time_spent_ms` (int; absent when unknown, as for an AI labeler's judgement that did not say);
* one row per item (consensus), `consensus_meta`: `labelers` (the ids of every labeler whose kept judgement of
  the item went into the consensus, in the order they judged), `comments` (one per labeler, in the same order: "" for
  none), `flags` (the sorted union of theirs), and `labeler_attributes` only when every one of them has the same
  attributes (then that dict, {} included). No `time_spent_ms`: it is a per-judgement figure.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def judgement_meta(r: Mapping[str, Any]) -> dict:
    """The columns of a row made from one judgement (`reading.current_judgements`' record `r`)."""
    out = {"labeler": r["labeler_public_id"], "labeler_attributes": dict(r.get("labeler_attributes") or {}),
           "comment": r.get("comment") or "", "flags": list(r.get("flags") or [])}
    if r.get("time_spent_ms") is not None:
        out["time_spent_ms"] = int(r["time_spent_ms"])
    return out


def consensus_meta(rs: Sequence[Mapping[str, Any]]) -> dict:
    """The columns of a row made from the consensus of the item's judgements `rs`."""
    out: dict[str, Any] = {"labelers": [r["labeler_public_id"] for r in rs],
                           "comments": [r.get("comment") or "" for r in rs],
                           "flags": sorted({f for r in rs for f in (r.get("flags") or [])})}
    attrs = [dict(r.get("labeler_attributes") or {}) for r in rs]
    if attrs and all(a == attrs[0] for a in attrs):
        out["labeler_attributes"] = attrs[0]
    return out
