"""User tags in prompts: how a personalized policy (and its scorer) knows whose prompt it is.

A user-conditioned policy sees its user as a plain-text tag at the start of the prompt, `<user:NAME> ` by default:
one template, written by `tag_prompt` wherever prompts are built (`prompt_texts(..., user_tag=...)`, `alignloop
generate --user`) and read back by `split_user_tag` wherever a prompt is scored (the reward model scores the untagged
prompt, weighted by that user's weights). Plain text rather than a new special token: every tokenizer encodes it, no
embedding has to be added to the policy, and a policy that has never seen a tag still reads the rest of the prompt.

    USER_TAG = "<user:{user}> "
    check_user(user, template=USER_TAG) -> str    # a DataError unless non-empty, no whitespace, no ">" (the
                                                  # characters that end the template's tag)
    tag_prompt(prompt, user, template=USER_TAG) -> str          # user None -> the prompt unchanged
    split_user_tag(text, template=USER_TAG) -> (user | None, rest)   # no (valid) tag -> (None, text)

A template holds `{user}` once, with text after it (the tag's end: "> " by default), so the name can be found again.

Whose judgement a record is, by the labeler context of the data contract (`META_COLUMNS`):
    meta_key(meta, by) -> str | None   # by "criterion": meta["criterion"]; "group": meta["labeler_attributes"]
                                       # ["group"]; "labeler": meta["labeler"]; None when the row does not say
"""
from __future__ import annotations

from alignloop.data.errors import DataError

USER_TAG = "<user:{user}> "


def check_user(user: object, template: str = USER_TAG) -> str:
    """`user` when it can be a tag's name: a non-empty string without whitespace or a character of the text that
    ends `template`'s tag (">" by default: it would end the tag early and the name would be read back wrong);
    otherwise a DataError."""
    if not isinstance(user, str) or not user:
        raise DataError(f"a user name must be a non-empty string, got {user!r}")
    ends = sorted(set(_template_parts(template)[1].strip()))
    if any(c.isspace() for c in user) or any(c in user for c in ends):
        raise DataError(f"user name {user!r}: no whitespace and no {' or '.join(repr(c) for c in ends)} (the name "
                        f"goes inside a prompt tag {template!r})")
    return user


def _template_parts(template: str) -> tuple[str, str]:
    """(text before `{user}`, text after it); a DataError for a template that could not be read back."""
    if not isinstance(template, str) or template.count("{user}") != 1:
        raise DataError(f"user tag template {template!r}: expected exactly one '{{user}}', e.g. {USER_TAG!r}")
    before, after = template.split("{user}")
    if not after:
        raise DataError(f"user tag template {template!r}: needs text after '{{user}}' to mark where the name ends, "
                        f"e.g. {USER_TAG!r}")
    return before, after


def tag_prompt(prompt: str, user: str | None, template: str = USER_TAG) -> str:
    """The prompt with its user's tag in front (`template` with the name filled in); unchanged when `user` is None."""
    before, after = _template_parts(template)
    if user is None:
        return prompt
    return f"{before}{check_user(user, template)}{after}{prompt}"


def split_user_tag(text: str, template: str = USER_TAG) -> tuple[str | None, str]:
    """(user, the prompt without its tag) for a text that starts with a tag of `template`; (None, text) when it
    does not, or when what stands in the name's place is not a valid name (so ordinary text is never cut)."""
    before, after = _template_parts(template)
    if not text.startswith(before):
        return None, text
    end = text.find(after, len(before))
    if end < 0:
        return None, text
    user = text[len(before):end]
    try:
        check_user(user, template)
    except DataError:
        return None, text
    return user, text[end + len(after):]


META_KEYS = ("criterion", "group", "labeler")


def meta_key(meta: dict, by: str) -> str | None:
    """What a judgement's labeler context says about `by` (one of META_KEYS): its criterion, its labeler's group
    (`labeler_attributes["group"]`) or its labeler; None when the context does not say (a consensus row has
    `labelers`, not one `labeler`)."""
    if by == "criterion":
        return meta.get("criterion")
    if by == "group":
        return (meta.get("labeler_attributes") or {}).get("group")
    if by == "labeler":
        return meta.get("labeler")
    raise ValueError(f"by must be one of {', '.join(META_KEYS)}, got {by!r}")
