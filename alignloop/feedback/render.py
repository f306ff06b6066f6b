"""Markdown for the labeling pages: prompts, model answers and guidelines, rendered safely.

Model text is untrusted (a model can be made to write anything, and imports come from files), so it goes through two
independent layers: markdown-it-py with raw HTML off (`<script>` in the text comes out as the text `<script>`,
links with unsafe schemes are left as text), then `nh3` (the ammonia sanitiser) with an allow-list of tags and
attributes, which would catch whatever the first layer let through. Links keep only http / https / mailto and get
`rel="noopener noreferrer nofollow"`. Images are not rendered (`![alt](url)` shows as a link to the image):
loading a remote image would tell its owner who is labeling, and when.

Fenced code blocks become `<pre><code class="language-x">`, single newlines stay line breaks (model answers use
them that way). The page also keeps the raw text (escaped by the template) for its raw-text toggle.
"""
from __future__ import annotations

from functools import lru_cache

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup

RENDER_CACHE_ITEMS = 2048  # texts never change once imported, and an item is shown to k labelers

ALLOWED_TAGS = {"p", "br", "hr", "strong", "em", "b", "i", "s", "del", "code", "pre", "blockquote", "ul", "ol",
                "li", "h1", "h2", "h3", "h4", "h5", "h6", "a", "table", "thead", "tbody", "tr", "th", "td"}
# no style attributes: the CSP (style-src 'self') refuses inline styles anyway (a table's column alignment is lost)
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
URL_SCHEMES = {"http", "https", "mailto"}
LINK_REL = "noopener noreferrer nofollow"
# code block languages whose class is kept (a label for the reader; nothing highlights them)
CODE_LANGUAGES = ("python", "py", "javascript", "js", "typescript", "ts", "json", "bash", "sh", "shell", "sql",
                  "c", "cpp", "java", "go", "rust", "ruby", "html", "css", "yaml", "toml", "text", "markdown")


def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False, "breaks": True})
    md.enable(["table", "strikethrough"])
    md.disable("image")
    return md


_MD = _parser()


def _clean(html: str) -> str:
    return nh3.clean(html, tags=ALLOWED_TAGS, attributes=ALLOWED_ATTRIBUTES, url_schemes=URL_SCHEMES,
                     link_rel=LINK_REL, strip_comments=True,
                     allowed_classes={"code": {f"language-{lang}" for lang in CODE_LANGUAGES}})


@lru_cache(maxsize=RENDER_CACHE_ITEMS)
def render_markdown(text: str | None) -> Markup:
    """`text` as sanitised HTML, safe to put into a page as it is."""
    return Markup(_clean(_MD.render(text or "")))
