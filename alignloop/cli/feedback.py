"""`alignloop feedback ...`: the human-feedback labeling app.

    alignloop feedback create --db fb.db --project hh --task-type pairwise --overlap-k 3 --guidelines g.md
    alignloop feedback import --db fb.db --project hh completions.jsonl
    alignloop feedback sample --db fb.db --project hh --prompts prompts.jsonl --model ./policy -n 4
    alignloop feedback add-labeler --db fb.db ann --role labeler --attr group=warm   (password prompted, or
                                                                                      --password-env)
    alignloop feedback set-attributes --db fb.db ann --attr locale=en-GB [--remove group] [--replace]
    alignloop feedback set-password --db fb.db ann   (prompted, or --password-env; ends ann's sessions)
    alignloop feedback deactivate --db fb.db ann     (and reactivate)
    alignloop feedback labelers --db fb.db [--json]
    alignloop feedback serve --db fb.db --host 127.0.0.1 --port 8000
    alignloop feedback stats --db fb.db --project hh [--json]
    alignloop feedback export --db fb.db --project hh --format preference --out prefs.jsonl [--labelers human]
                                [--criterion helpful | all]
    alignloop feedback create --db fb.db --project demos --task-type demonstration --min-chars 40
    alignloop feedback export --db fb.db --project demos --format sft|messages|preference --out d.jsonl
                                [--review not_rejected | accepted | all]
    alignloop feedback create --db fb.db --project chat --task-type conversation --model ./policy [--model ./other]
                                [--max-new-tokens 128 --temperature 0.8 --max-turns 10 --open-start]

Only `serve` loads the web app (FastAPI); the other commands need the store (the `web` extra: SQLAlchemy, argon2),
`stats` and `export` the statistics (numpy, scipy, scikit-learn), `export` and `sample` torch (`alignloop.data`,
the model). Those modules are imported inside the commands that use them, so `alignloop feedback --help` works
without the extra and each command loads only what it needs.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

import click

from alignloop.cli.judge import judge as judge_command
from alignloop.data import check_writable, split_steps, write_rows
from alignloop.errors import UserError


class _UserFacing(click.ClickException):
    exit_code = 2


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise _UserFacing(str(e)) from None
    return wrapper


db_option = click.option("--db", default="feedback.db", show_default=True, envvar="ALIGNLOOP_FEEDBACK_DB",
                         help="SQLite file path or a database URL (postgresql://user@host/db).")


def project_option(fn):
    """--project NAME or --project-id N (one of them): a name is never read as an id, nor an id as a name."""
    fn = click.option("--project-id", type=int, default=None, help="The project's id (instead of --project).")(fn)
    return click.option("--project", "-p", default=None, help="Project name (or give --project-id).")(fn)


def _project_ref(project: str | None, project_id: int | None) -> str | int:
    """What `Store.get_project` takes: the name (a str, as given) or the id (an int)."""
    if (project is None) == (project_id is None):
        raise UserError("give the project as --project NAME or --project-id N (one of them)")
    return project if project is not None else project_id


def _check_out(out: str | None) -> None:
    """Refuse an --out that `alignloop.data.write_rows` cannot write (by its suffix) before any work is done."""
    if out:
        try:
            check_writable(out)
        except UserError as e:
            raise UserError(f"--out {e}") from None


def _store(db: str, create: bool = False):
    from alignloop.feedback.store import Store  # noqa: PLC0415 - the web extra (SQLAlchemy, argon2) stays optional

    return Store(db, create=create)


@click.group("feedback", context_settings={"help_option_names": ["-h", "--help"]})
def feedback():
    """The human-feedback labeling app: create, import, sample, add-labeler, set-attributes, labelers, serve, stats,
    export, judge (an AI labeler)."""


@feedback.command()
@db_option
@click.option("--project", "-p", default=None, help="Also create this project (else just create/migrate the db).")
@click.option("--task-type", type=click.Choice(["pairwise", "rank", "thumbs", "likert", "steps", "demonstration",
                                                "conversation"]), default="pairwise", show_default=True,
              help="steps: rate each step of a solution good / neutral / bad (process supervision); demonstration: "
                   "write (or edit) the response to each prompt; conversation: talk with the served model, choosing "
                   "between two candidate answers each turn.")
@click.option("--overlap-k", type=int, default=3, show_default=True, help="Distinct labelers per item.")
@click.option("--gold-rate", type=float, default=0.0, show_default=True,
              help="Share of assignments that are gold items (known answers).")
@click.option("--guidelines", type=click.Path(dir_okay=False), default=None, help="Markdown file of guidelines.")
@click.option("--settings", "settings_json", default=None,
              help="Project settings as JSON (flags, thresholds, questions).")
@click.option("--question", "question_opts", multiple=True, metavar="NAME=TEXT",
              help="A question asked of each pairwise item (repeat for several: each is exported as its own "
                   "criterion), e.g. --question helpful='Which is more helpful?'. Sets the questions setting.")
@click.option("--min-chars", type=int, default=None,
              help="demonstration: the shortest response taken, in characters (settings.min_chars). [default: 20]")
@click.option("--model", "models", multiple=True,
              help="conversation: the model served (a local folder or hub id); twice to compare two models "
                   "(settings.models).")
@click.option("--max-new-tokens", type=int, default=None,
              help="conversation: tokens per candidate answer (settings.generation). [default: 128]")
@click.option("--temperature", type=float, default=None,
              help="conversation: sampling temperature (settings.generation). [default: 0.8]")
@click.option("--max-turns", type=int, default=None,
              help="conversation: turns at most per conversation (settings.max_turns). [default: 10]")
@click.option("--open-start", is_flag=True, default=None,
              help="conversation: labelers may also begin a conversation with their own first message.")
@_user_errors
def create(db, project, task_type, overlap_k, gold_rate, guidelines, settings_json, question_opts, min_chars, models,
           max_new_tokens, temperature, max_turns, open_start):
    """Create (or migrate) the database, and optionally a project."""
    store = _store(db, create=True)
    if project:
        md = ""
        if guidelines:
            p = Path(guidelines)
            if not p.exists():
                raise UserError(f"{guidelines}: no such file")
            md = p.read_text(encoding="utf-8")
        settings = None
        if settings_json:
            try:
                settings = json.loads(settings_json)
            except json.JSONDecodeError as e:
                raise UserError(f"--settings: not valid JSON ({e.msg})") from None
            if not isinstance(settings, dict):
                raise UserError("--settings must be a JSON object")
        if question_opts:
            settings = {**(settings or {}), "questions": _questions(question_opts)}
        task_settings = _task_settings(min_chars, models, max_new_tokens, temperature, max_turns, open_start)
        if task_settings:
            settings = {**(settings or {}), **task_settings}  # checked with the others (settings.<name> errors)
        pr = store.create_project(project, task_type, md, overlap_k, gold_rate, settings)
        asks = pr.settings.get("questions")
        click.echo(f"created project {pr.name} ({pr.task_type}, k={pr.overlap_k}, gold rate {pr.gold_rate})"
                   + (f"; questions: {', '.join(q['name'] for q in asks)}" if asks else ""))
    elif question_opts or settings_json or _task_settings(min_chars, models, max_new_tokens, temperature, max_turns,
                                                          open_start):
        raise UserError("--question, --settings and the task's options are a project's: give --project too")
    else:
        click.echo(f"database ready: {store.url}")


def _task_settings(min_chars, models, max_new_tokens, temperature, max_turns, open_start) -> dict:
    """The demonstration / conversation options of `create` as settings (`projects.check_settings` checks them and
    refuses those of another task type, naming settings.<name>)."""
    out: dict = {}
    if min_chars is not None:
        out["min_chars"] = min_chars
    if models:
        if len(models) > 2:
            raise UserError(f"--model: at most 2 (two models compared), got {len(models)}")
        out["models"] = list(models)
    generation = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("temperature", temperature))
                  if v is not None}
    if generation:
        out["generation"] = generation
    if max_turns is not None:
        out["max_turns"] = max_turns
    if open_start:
        out["open_start"] = True
    return out


def _questions(opts: tuple[str, ...]) -> list[dict]:
    """--question NAME=TEXT options as the questions setting (checked when the project is created)."""
    out = []
    for o in opts:
        name, sep, text = o.partition("=")
        if not sep:
            raise UserError(f"--question {o!r}: write NAME=TEXT, e.g. helpful='Which response is more helpful?'")
        out.append({"name": name.strip(), "question": text.strip()})
    return out


@feedback.command("import")
@db_option
@project_option
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model", default=None, help="Model name for completions that do not name one.")
@_user_errors
def import_cmd(db, project, project_id, files, model):
    """Import completions from JSONL files: {"prompt", "completions": [...]} or {"prompt", "completion"}. A steps
    project: one solution per row, {"prompt", "completions": [steps], "labels"?, "gold"?}. Rows already imported
    (the same "id", or the same content) are skipped and counted: importing a file again adds only what is missing."""
    for f in files:
        if not Path(f).is_file():
            raise UserError(f"{f}: no such file")
    store = _store(db)
    p = store.get_project(_project_ref(project, project_id))
    for f in files:
        r = store.import_jsonl(p.id, f, model=model)
        click.echo(f"{f} -> project {p.name} (id {p.id}): {r.summary()}")
        for w in r.warnings:
            click.echo(f"warning: {w}", err=True)


@feedback.command()
@db_option
@project_option
@click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False),
              help='JSONL of {"prompt": str | messages}.')
@click.option("--model", required=True, help="Local model folder (or hub id already cached).")
@click.option("-n", "--num-completions", "n", type=int, default=2, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Sequences per generation call (prompts per call × n).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the sampled rows here.")
@_user_errors
def sample(db, project, project_id, prompts_file, model, n, max_new_tokens, temperature, top_p, top_k, batch_size,
           seed, out):
    """Sample N completions per prompt with a model and import them."""
    from alignloop.feedback.importing import (  # noqa: PLC0415 - web extra (SQLAlchemy), optional
        comparable_completions,
        read_jsonl,
    )
    from alignloop.feedback.sampling import sample_records  # noqa: PLC0415 - heavy (torch, transformers)

    if n < 1:
        raise UserError("-n must be at least 1")
    _check_out(out)
    store = _store(db)
    p = store.get_project(_project_ref(project, project_id))
    rows = read_jsonl(prompts_file)
    recs = sample_records(rows, model, n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, batch_size=batch_size, seed=seed)
    empty = 0
    if p.task_type == "steps":  # one solution per row, its text split into steps ("\n") on import
        texts = [(r["prompt"], c) for r in recs for c in r["completions"]]
        recs = [{"prompt": q, "completion": c} for q, c in texts if split_steps(c)]
        empty = len(texts) - len(recs)  # a sample with no step (empty, only separators) has nothing to rate
        if not recs:
            raise UserError(f"every one of the {empty} samples is empty (no step to rate); nothing imported")
    else:  # an empty sample, or one equal to another of its prompt, has nothing to compare (the import refuses it)
        recs, empty = comparable_completions(recs)
    if out:
        write_rows(recs, out)
    r = store.import_records(p.id, recs)
    click.echo(f"sampled {r.completions} completions for {r.prompts} prompts: {r.items} items"
               + (f" ({empty} empty{'' if p.task_type == 'steps' else ' or repeated'} samples left out)"
                  if empty else ""))


@feedback.command("add-labeler")
@db_option
@click.argument("username")
@click.option("--role", type=click.Choice(["labeler", "admin"]), default="labeler", show_default=True)
@click.option("--password-env", default=None, help="Read the password from this environment variable.")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.option("--attr", "attrs", multiple=True, metavar="NAME=VALUE",
              help="An attribute exported with the labeler's judgements (repeat): group=warm, locale=en-GB, ...")
@_user_errors
def add_labeler(db, username, role, password_env, password_stdin, attrs):
    """Add a labeler (or an admin). The password is prompted for unless --password-env/--password-stdin."""
    from alignloop.feedback.projects import parse_attributes  # noqa: PLC0415 - web extra (SQLAlchemy), optional

    attributes = parse_attributes(attrs)  # checked before a password is asked for
    password = _new_password(password_env, password_stdin)
    store = _store(db)
    lab = store.add_labeler(username, password, role, attributes)
    click.echo(f"added {lab.role} {lab.username}" + (f" ({_attrs_text(lab.attributes)})" if lab.attributes else ""))


def _attrs_text(attributes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in attributes.items())


def _new_password(password_env: str | None, password_stdin: bool) -> str:
    """The new password: from the environment variable, stdin's first line, or prompted twice. Its rules
    (`security.password_problem`) are the store's."""
    if password_env:
        password = os.environ.get(password_env)
        if not password:
            raise UserError(f"environment variable {password_env} is empty or unset")
        return password
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


@feedback.command("set-password")
@db_option
@click.argument("username")
@click.option("--password-env", default=None, help="Read the password from this environment variable.")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@_user_errors
def set_password(db, username, password_env, password_stdin):
    """Change a labeler's password (prompted unless --password-env/--password-stdin); signs them out everywhere."""
    store = _store(db)
    lab = store.set_password(username, _new_password(password_env, password_stdin))
    click.echo(f"password changed for {lab.username}; their sessions were ended")


@feedback.command()
@db_option
@click.argument("username")
@_user_errors
def deactivate(db, username):
    """Deactivate a labeler: they cannot sign in, their sessions end at once; their judgements stay."""
    lab = _store(db).set_active(username, False)
    click.echo(f"deactivated {lab.username}")


@feedback.command()
@db_option
@click.argument("username")
@_user_errors
def reactivate(db, username):
    """Let a deactivated labeler sign in again (with their password)."""
    lab = _store(db).set_active(username, True)
    click.echo(f"reactivated {lab.username}")


@feedback.command("set-attributes")
@db_option
@click.argument("username")
@click.option("--attr", "attrs", multiple=True, metavar="NAME=VALUE", help="Set this attribute (repeat).")
@click.option("--remove", multiple=True, metavar="NAME", help="Remove this attribute (repeat).")
@click.option("--replace", is_flag=True, help="Replace all the labeler's attributes with the --attr ones.")
@_user_errors
def set_attributes(db, username, attrs, remove, replace):
    """Change a labeler's attributes (group, locale, expertise, ...: exported with their judgements)."""
    from alignloop.feedback.projects import parse_attributes  # noqa: PLC0415 - web extra (SQLAlchemy), optional

    if not (attrs or remove or replace):
        raise UserError("nothing to change: give --attr NAME=VALUE, --remove NAME or --replace")
    if replace and remove:
        raise UserError("--replace sets exactly the --attr ones: --remove has nothing to add")
    lab = _store(db).set_labeler_attributes(username, parse_attributes(attrs), replace=replace, remove=remove)
    click.echo(f"{lab.username}: {_attrs_text(lab.attributes) or 'no attributes'}")


@feedback.command("labelers")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_user_errors
def labelers_cmd(db, as_json):
    """List the labelers: username, role, kind, the id exports name them by, attributes."""
    labs = _store(db).list_labelers()
    rows = [{"username": x.username, "role": x.role, "kind": x.kind, "active": x.active, "export_id": x.public_id,
             "attributes": x.attributes or {}} for x in labs]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'username':<20}{'role':<9}{'kind':<7}{'export id':<19}attributes")
    for r in rows:
        click.echo(f"{r['username']:<20}{r['role']:<9}{r['kind']:<7}{r['export_id']:<19}{_attrs_text(r['attributes'])}")


@feedback.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--secret-key", default=None, envvar="ALIGNLOOP_FEEDBACK_SECRET",
              help="Signs session cookies (else a generated key file next to the database).")
@click.option("--secure-cookies", is_flag=True, help="Send cookies only over HTTPS (behind a TLS proxy).")
@click.option("--log-level", default="warning", show_default=True)
@click.option("--session-idle-hours", type=click.FloatRange(min=0, min_open=True), default=12.0, show_default=True,
              help="A session ends after this long without a request.")
@click.option("--session-max-days", type=click.FloatRange(min=0, min_open=True), default=14.0, show_default=True,
              help="A session ends this long after sign-in, however active.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="The largest request body (413 past it).")
@click.option("--max-import-mb", type=click.FloatRange(min=0, min_open=True), default=256.0, show_default=True,
              help="The largest file the admin import page takes.")
@click.option("--gen-queue", type=click.IntRange(min=1), default=8, show_default=True,
              help="Conversations: generations queued or running at most (more are refused: retry).")
@click.option("--gen-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Conversations: seconds a generation may take before it fails (and can be retried).")
@click.option("--gen-threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Conversations: torch threads of the generation process.")
@_user_errors
def serve(db, host, port, secret_key, secure_cookies, log_level, session_idle_hours, session_max_days, max_body_mb,
          max_import_mb, gen_queue, gen_timeout, gen_threads):
    """Serve the labeling app."""
    import uvicorn  # noqa: PLC0415 - web extra, and only `serve` loads the web server

    from alignloop.feedback.app import create_app  # noqa: PLC0415 - only `serve` loads the web app (FastAPI)

    app = create_app(_store(db, create=True), secret_key=secret_key, secure_cookies=secure_cookies,
                     session_idle_timeout=int(session_idle_hours * 3600), session_max_age=int(session_max_days * 86400),
                     max_body_bytes=int(max_body_mb * 2**20), max_import_bytes=int(max_import_mb * 2**20),
                     generation_queue=gen_queue, generation_timeout_s=gen_timeout, generation_threads=gen_threads)
    click.echo(f"serving on http://{host}:{port}")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _echo_demonstrations(d: dict) -> None:
    rv = d["reviews"]
    click.echo(f"demonstrations: {d['n']} ({d['edited']} edits), accepted {rv.get('accepted', 0)}, rejected "
               f"{rv.get('rejected', 0)}, not reviewed {rv.get('pending', 0)}, mean {_fmt(d['mean_chars'])} chars")
    for w, r in d["labelers"].items():
        click.echo(f"  {w!s:<16}{r['n']:>5} demonstrations  accepted {r.get('accepted', 0)}  rejected "
                   f"{r.get('rejected', 0)}  mean {r['mean_chars']:.0f} chars")


def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.0%}" if pct else f"{v:.2f}"


def _clean(x):
    """NaN (an undefined statistic) as None, in nested dicts and lists too: JSON has no NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _echo_ai_agreement(ai: dict) -> None:
    """The AI labelers against the people (`quality.ai_human_agreement`), one line each."""
    h = ai["humans"]
    click.echo(f"AI labelers vs people (non-gold items); people among themselves: {_fmt(h['agreement'], True)} "
               f"pairwise agreement over {h['pairs']} pairs")
    click.echo(f"{'AI labeler':<16}{'items':>6}{'majority':>10}{'kappa':>7}{'people':>8}{'first pos.':>14}  model")
    for w, d in ai["ai"].items():
        pos = d["position"]
        shift = f"{_fmt(pos['before'], True)}->{_fmt(pos['after'], True)}" if pos else "-"
        click.echo(f"{w!s:<16}{d['n']:>6}{_fmt(d['majority_agreement'], True):>10}{_fmt(d['majority_kappa']):>7}"
                   f"{_fmt(d['human_agreement'], True):>8}{shift:>14}  {d['model']}")


def _echo_step_agreement(st: dict) -> None:
    """A steps project's agreement per step (`quality.step_agreement`): pooled, first error, per step position."""
    click.echo(f"per step: {_fmt(st['percent_agreement'], True)} pairwise agreement over {st['pairs']} pairs on "
               f"{st['units']} steps; first error at the same step: {_fmt(st['first_error_agreement'], True)} of "
               f"{st['first_error_pairs']} pairs")
    click.echo("  ".join(f"step {r['step']}: {_fmt(r['percent_agreement'], True)} (kappa {_fmt(r['fleiss_kappa'])}, "
                         f"{r['units']})" for r in st["by_position"]))


def _echo_questions(qs: dict) -> None:
    """A several-question project's counts and agreement per question (`dashboard.question_stats`)."""
    click.echo("per question (the labeler table reads the first):")
    click.echo(f"  {'question':<16}{'n':>5}{'a':>5}{'b':>5}{'tie':>5}{'bad':>5}{'fleiss':>8}  text")
    for name, q in qs.items():
        c = q["choices"]
        click.echo(f"  {name:<16}{q['judgements']:>5}{c.get('a', 0):>5}{c.get('b', 0):>5}{c.get('tie', 0):>5}"
                   f"{c.get('both_bad', 0):>5}{_fmt(q['agreement']['fleiss_kappa']):>8}  {q['question']}")


@feedback.command()
@db_option
@project_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_user_errors
def stats(db, project, project_id, as_json):
    """Labeler quality and agreement for a project."""
    from alignloop.feedback.dashboard import dashboard_data  # noqa: PLC0415 - heavy (numpy, scipy, scikit-learn)

    store = _store(db)
    p = store.get_project(_project_ref(project, project_id))
    d = dashboard_data(store, p)
    if as_json:
        click.echo(json.dumps(_clean({"project": p.name, "summary": d["summary"], "agreement": d["agreement"],
                                      "labelers": {w: {**s, "flags": d["flags"][w]} for w, s in d["stats"].items()},
                                      "cohen_kappa": [{"a": a, "b": b, "kappa": v}
                                                      for (a, b), v in d["kappas"].items()],
                                      "ai_human_agreement": d["ai_agreement"],
                                      **({"questions": d["question_stats"]} if d.get("question_stats") else {}),
                                      **({"step_agreement": d["steps"]} if d.get("steps") else {}),
                                      **({"rank": d["rank"]} if d.get("rank") else {}),
                                      **({"demonstrations": d["demonstrations"]} if d.get("demonstrations") else {}),
                                      **({"conversations": d["conversations"]} if d.get("conversations") else {})}),
                              indent=2))
        return
    s, a = d["summary"], d["agreement"]
    click.echo(f"{p.name} ({p.task_type}, k={p.overlap_k}): {s['items']} items, {s['complete_items']} complete, "
               f"{s['judgement_rows']} judgement rows" + (f" ({s['ai_judgement_rows']} by AI labelers)"
                                                         if s.get("ai_judgement_rows") else ""))
    click.echo("  ".join(f"{k}={_fmt(v)}" for k, v in a.items()))
    if d.get("steps"):
        _echo_step_agreement(d["steps"])
    if d.get("demonstrations"):
        _echo_demonstrations(d["demonstrations"])
    if d.get("conversations"):
        c = d["conversations"]
        click.echo(f"conversations: {c['n']} ({c['ended']} ended, {c['open']} open), {c['turns']} turns "
                   f"({_fmt(c['mean_turns'])} per conversation), mean rating {_fmt(c['mean_rating'])} "
                   f"({c['ratings']} rated)")
    if d.get("question_stats") and len(d["question_stats"]) > 1:
        _echo_questions(d["question_stats"])
    click.echo(f"{'labeler':<16}{'kind':<7}{'n':>5}{'agree':>7}{'gold':>7}{'left':>6}{'tie':>6}{'sec':>7}"
               "  (model) flags")
    for w, st in d["stats"].items():
        model = f"({st['model']})" if st["kind"] == "ai" else ""
        click.echo(f"{w!s:<16}{st['kind']:<7}{st['n']:>5}{_fmt(st['agreement']):>7}{_fmt(st['gold_accuracy']):>7}"
                   f"{_fmt(st['left_share'], True):>6}{_fmt(st['tie_rate'], True):>6}{_fmt(st['median_seconds']):>7}"
                   f"  {'; '.join([model, *d['flags'][w]] if model else d['flags'][w])}")
    if d["ai_agreement"]:
        _echo_ai_agreement(d["ai_agreement"])


@feedback.command()
@db_option
@project_option
@click.option("--format", "fmt", type=click.Choice(["preference", "ranking", "unpaired", "steps", "sft", "messages"]),
              default=None,
              help="preference, ranking or unpaired; steps for a steps project (its only format; the default there); "
                   "a demonstration or conversation project: sft, messages or preference (a demonstration's edits "
                   "as pairs, a conversation's choices per turn). [default: preference; sft for demonstrations]")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
@click.option("--mode", type=click.Choice(["consensus", "all"]), default="consensus", show_default=True,
              help="One row per item from the consensus, or one per current judgement.")
@click.option("--consensus", type=click.Choice(["majority", "dawid_skene"]), default="majority", show_default=True)
@click.option("--ties", type=click.Choice(["drop", "both"]), default="drop", show_default=True,
              help="Ties: drop, or write both orders with margin 0.")
@click.option("--both-bad", type=click.Choice(["drop", "tie"]), default="drop", show_default=True)
@click.option("--include-flagged", is_flag=True, help="Keep judgements of labelers flagged by the thresholds.")
@click.option("--include-gold", is_flag=True, help="Keep gold items.")
@click.option("--likert-threshold", type=int, default=5, show_default=True, help="Likert >= this is a good label.")
@click.option("--labelers", type=click.Choice(["all", "human", "ai"]), default="all", show_default=True,
              help="Whose judgements to export: everyone, people only, or AI labelers only.")
@click.option("--criterion", default=None, metavar="NAME|all",
              help="A project asking several questions: export this question's answers, or all of them in one file "
                   "(rows carry their criterion). [default: the first question]")
@click.option("--min-labels", type=int, default=None,
              help="Consensus: leave out items with fewer kept labels than this (counted in the report). "
                   "[default: the project's min_labels setting: 2 when k >= 2, else 1]")
@click.option("--review", type=click.Choice(["not_rejected", "accepted", "all"]), default="not_rejected",
              show_default=True, help="A demonstration project: which demonstrations by the admins' review.")
@click.option("--allow-empty", is_flag=True,
              help="Write the file even when no row results (else: an error saying why).")
@_user_errors
def export(db, project, project_id, fmt, out, mode, consensus, ties, both_bad, include_flagged, include_gold,
           likert_threshold, labelers, criterion, min_labels, review, allow_empty):
    """Write a preference, ranking, unpaired or steps dataset the trainers read (a demonstration or conversation
    project: sft, messages or preference)."""
    from alignloop.feedback import export as ex  # noqa: PLC0415 - heavy (scipy, scikit-learn)

    _check_out(out)
    store = _store(db)
    p = store.get_project(_project_ref(project, project_id))
    fmt = fmt or ex.default_format(p.task_type)
    if p.task_type in ex.PROMPT_TASKS:
        _export_prompt_task(ex, store, p, fmt, out, review, allow_empty)
        return
    opts = ex.project_options(p, format=fmt, mode=mode, consensus=consensus, ties=ties, both_bad=both_bad,
                              exclude_flagged=not include_flagged, include_gold=include_gold,
                              likert_threshold=likert_threshold, labelers=labelers, criterion=criterion,
                              min_labels=min_labels)
    rows, summary = ex.export_records(store, p.id, opts)
    if not rows and not allow_empty:  # 0 rows is almost always a mistake (everyone flagged, min_labels too high)
        raise UserError(ex.empty_message(summary) + "; nothing written (--allow-empty writes the empty file)")
    write_rows(rows, out)
    who = "" if labelers == "all" else f" ({'people' if labelers == 'human' else 'AI labelers'} only)"
    crit = f" (criterion {', '.join(summary['criteria'])})" if criterion else ""
    click.echo(f"wrote {len(rows)} {fmt} rows{crit} to {out} from {summary['used']} of {summary['judgements']} "
               "judgements" + who
               + (f"; dropped {summary['dropped']}" if summary["dropped"] else "")
               + (f"; flagged labelers left out: {', '.join(summary['flagged_labelers'])}"
                  if summary["flagged_labelers"] and not include_flagged else ""))


def _export_prompt_task(ex, store, p, fmt: str, out: str, review: str, allow_empty: bool) -> None:
    """A demonstration's or conversation's export (`export.export_prompt_task`)."""
    rows, summary = ex.export_prompt_task(store, p, fmt, review)
    if not rows and not allow_empty:
        raise UserError(ex.prompt_task_empty_message(p, summary) + "; nothing written (--allow-empty writes the empty "
                        "file)")
    write_rows(rows, out)
    left = summary.get("left_out")
    click.echo(f"wrote {len(rows)} {fmt} rows to {out} from project {p.name} ({p.task_type})"
               + (f"; left out: {left}" if left else ""))


# `alignloop feedback judge` is `alignloop judge`: an AI labeler is a labeler of this store
feedback.add_command(judge_command, "judge")
