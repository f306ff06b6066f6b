"""Every link, form and redirect names a project by `Project.url_key`: its name, or its id for a name made before
the slug rule that reads as an id or a path step ("2024", ".", ".."). Built from the name, the links of a project
named "2024" led to the project with id 2024, and those of "." / ".." to another page altogether. These tests follow
the links and forms of the labeler's and the admin's pages and check that every page they reach names the project
they started from."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from fb_helpers import PASSWORD, csrf_of, field_of

from alignloop.feedback.models import Project

LEGACY = ("2024", ".", "..")       # refused for new projects today; older versions created them
HREF = re.compile(r'href="(/(?:admin/)?p/[^"?#]*)"')
FORM = re.compile(r"<form\b[^>]*>")
CRUMB = re.compile(r'class="crumbs">.*?› (.+?)(?: ›| \(|</p>)', re.S)  # "Projects › NAME ›", "Admin › NAME (...)"


def add_project(store, name: str, pid: int | None = None) -> Project:
    """A project with two pairwise items, stored as an older version could (no name check), with id `pid` if given."""
    with store.write() as s:
        p = Project(name=name, task_type="pairwise", guidelines_md=f"How to judge in {name}", overlap_k=1,
                    gold_rate=0.0, settings={"flags": []})
        if pid is not None:
            p.id = pid
        s.add(p)
        s.flush()
    store.import_records(p.id, [{"prompt": f"{name}: question {i}", "completions": [f"a{i}", f"b{i}"]}
                                for i in range(2)])
    return p


@pytest.fixture
def projects(store) -> dict[str, Project]:
    """Legacy "2024" (id 1), "." and "..", a project whose id IS 2024, and a project made today."""
    ps = [add_project(store, name) for name in LEGACY] + [add_project(store, "id-2024", pid=2024)]
    ps.append(store.create_project("alpha", "pairwise", overlap_k=1))
    store.import_records("alpha", [{"prompt": f"alpha {i}", "completions": ["x", "y"]} for i in range(2)])
    store.add_labeler("ann", PASSWORD)
    store.add_labeler("boss", PASSWORD, role="admin")
    out = {p.name: p for p in ps}
    assert out["2024"].url_key == str(out["2024"].id) != "2024" and out["id-2024"].id == 2024
    return out


def project_on(html: str) -> str | None:
    """The project a page is about, as its crumbs name it."""
    m = CRUMB.search(html)
    return m.group(1) if m else None


def walk(c, start: str, name: str) -> set[str]:
    """GET `start` and every project link reachable from it (hrefs under /p/ and /admin/p/); each page must be a
    200 that names project `name`. Returns the pages visited."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        r = c.get(url)
        assert r.status_code == 200, (name, url, r.status_code)
        assert project_on(r.text) == name, (name, url, project_on(r.text))
        todo += HREF.findall(r.text)
    return seen


def forms_of(html: str) -> dict[str, str]:
    """{form id: its action} of the page's forms that post to a project's routes."""
    out = {}
    for tag in FORM.findall(html):
        fid, action = re.search(r'id="([^"]+)"', tag), re.search(r'action="(/(?:admin/)?p/[^"]*)"', tag)
        if fid and action:
            out[fid.group(1)] = action.group(1)
    return out


def post_form(c, page, form_id: str, name: str, **fields):
    """POST the page's form `form_id` (with its CSRF token): it must redirect (303) to a page naming `name`."""
    actions = forms_of(page.text)
    assert form_id in actions, (name, form_id, list(actions))
    r = c.post(actions[form_id], data={"csrf_token": csrf_of(page.text), **fields}, follow_redirects=False)
    assert r.status_code == 303, (name, form_id, r.status_code, r.text[:300])
    target = c.get(urlsplit(r.headers["location"]).path)
    assert target.status_code == 200 and project_on(target.text) == name, (name, form_id, r.headers["location"])
    return target


def rows_of(html: str, row: str) -> dict[str, list[str]]:
    """{project name: its links} of a table listing projects (the first cell of each row is the name)."""
    return {m.group(1): HREF.findall(m.group(2)) for m in re.finditer(row + r"\s*<td>(.*?)</td>(.*?)</tr>", html, re.S)}


def test_project_list_links_lead_to_their_own_project(make_client, projects):
    c = make_client("ann")
    rows = rows_of(c.get("/").text, "<tr>")
    assert set(rows) == set(projects)
    for name, links in rows.items():
        assert len(links) == 3  # Label, Guidelines, My judgements
        for link in links:
            walk(c, link, name)
    assert set(rows["2024"]) == {"/p/1/label", "/p/1/guidelines", "/p/1/history"}
    assert set(rows["id-2024"]) == {"/p/id-2024/label", "/p/id-2024/guidelines", "/p/id-2024/history"}


def test_labeling_forms_and_redirects_stay_in_their_project(make_client, projects):
    """Start, submit, skip, the "all done" page, undo, "My judgements" and an edit, each project in turn: every
    form posts to the project's own routes and every redirect comes back to its own pages."""
    c = make_client("ann")
    rows = rows_of(c.get("/").text, "<tr>")
    for name in projects:
        label_link = next(link for link in rows[name] if link.endswith("/label"))
        start = c.get(label_link)
        assert project_on(start.text) == name and 'id="start-form"' in start.text
        page = post_form(c, start, "start-form", name)
        walk(c, urlsplit(str(page.url)).path, name)                # guidelines, history from the label page
        page = post_form(c, page, "judge", name, idempotency_key=field_of(page.text, "idempotency_key"),
                         choice="left", strength="better")
        assert 'id="judge"' in page.text                           # the second item
        done = post_form(c, page, "skip-form", name)
        assert 'id="all-done"' in done.text
        walk(c, urlsplit(str(done.url)).path, name)
        page = post_form(c, done, "undo-form", name)               # the skip undone: its item again
        assert 'id="judge"' in page.text
        history = walk(c, next(link for link in rows[name] if link.endswith("/history")), name)
        edit_link = next(link for link in history if "/edit/" in link)
        edit = c.get(edit_link)
        back = post_form(c, edit, "judge", name, idempotency_key=field_of(edit.text, "idempotency_key"),
                         choice="right", strength="better")
        assert urlsplit(str(back.url)).path.endswith("/history")


def test_admin_links_lead_to_their_own_project(make_client, projects):
    c = make_client("boss")
    rows = rows_of(c.get("/admin").text, r'<tr id="project-\d+">')
    assert set(rows) == set(projects)
    for name, links in rows.items():
        assert len(links) == 5  # Dashboard, Review, Settings, Labelers, Import
        pages: set[str] = set()
        for link in links:
            pages |= walk(c, link, name)
        dashboard = c.get(next(link for link in links if link.count("/") == 3))
        action = forms_of(dashboard.text).get("export-form")
        assert action and action.endswith("/export"), name
        r = c.get(action, params={"allow_empty": "true"})
        assert r.status_code == 200, (name, r.text[:300])
        assert f'filename="{name}-' in r.headers["content-disposition"], (name, r.headers["content-disposition"])
    assert "/admin/p/1" in rows["2024"] and "/admin/p/id-2024" in rows["id-2024"]
