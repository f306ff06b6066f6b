"""`alignloop data`: check data files and convert between formats.

    alignloop data validate pairs.jsonl
    alignloop data convert rankings.jsonl pairs.parquet --to pairs
"""
from __future__ import annotations

import click

from alignloop.data import (
    KINDS,
    DataStats,
    PreferenceGroup,
    groups_to_rows,
    groups_to_unpaired,
    join_steps,
    outcome_label,
    parse_rows,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
    write_rows,
)
from alignloop.data.readers import read_raw_rows
from alignloop.data.tokenize import TRUNCATIONS
from alignloop.errors import UserError
from alignloop.models import load_tokenizer

TARGETS = ("auto", "pairs", "preference", "unpaired", "prompt", "sft")


class DataCommandError(click.ClickException):
    """A user mistake: printed as `error: ...` without a traceback; exit status 2."""
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _tokenizer(name: str | None):
    if name is None:
        return None
    try:
        return load_tokenizer(name)
    except UserError as e:
        raise DataCommandError(str(e)) from None


def _load(path: str, kind: str | None, split: str, include_ties: bool, margins: str,
          tokenizer=None) -> tuple[list, DataStats]:
    """Read and validate, collecting bad rows in the stats (the commands decide what to do with them)."""
    stats = DataStats()
    try:
        rows = read_raw_rows(path, split, stats)
        records = parse_rows(rows, kind, tokenizer=tokenizer, include_ties=include_ties, margins=margins,
                             stats=stats)
        return records, stats
    except UserError as e:
        raise DataCommandError(str(e)) from None


def _print_bad_rows(stats: DataStats, err: bool = True) -> None:
    for message in stats.errors:
        click.echo(f"  {message}", err=err)
    if stats.bad_rows > len(stats.errors):
        click.echo(f"  ... and {stats.bad_rows - len(stats.errors)} more", err=err)


kind_option = click.option("--kind", type=click.Choice(KINDS), default=None,
                           help="The data format; detected from the columns when not given.")
split_option = click.option("--split", default="train", show_default=True,
                            help="The split to read from a datasets folder or hub dataset.")
skip_option = click.option("--skip-bad-rows", is_flag=True,
                           help="Skip rows that fail validation (they are counted and listed) instead of failing.")
ties_option = click.option("--include-ties", is_flag=True,
                           help="Keep tied ranking pairs (margin 0, tie=true); by default they are skipped.")
tokenizer_option = click.option("--tokenizer", default=None, metavar="NAME_OR_PATH",
                                help="A tokenizer (local folder or hub id) to apply its chat template to "
                                     "conversational data (and, for validate, to count tokens).")
margins_option = click.option("--margins", type=click.Choice(["small", "large"]), default="small", show_default=True,
                              help="Llama 2 margin table used to turn a `strength` column into `margin`.")


def read_options(fn):
    """The options every command that reads a data file takes."""
    for option in reversed((kind_option, split_option, skip_option, ties_option, margins_option, tokenizer_option)):
        fn = option(fn)
    return fn


@click.group(name="data", help="Check data files and convert them between formats.")
def data() -> None:
    pass


@data.command(help="Check FILE: print its format, row counts and every bad row (file, line, field). "
                   "Exits with status 2 when there are bad rows, unless --skip-bad-rows.")
@click.argument("file")
@read_options
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="With --tokenizer: count the examples (SFT, prompts) or pairs that this token limit would "
                   "truncate or drop.")
@click.option("--truncation", type=click.Choice(TRUNCATIONS), default="keep_end", show_default=True,
              help="With --max-length: keep_end cuts the prompt from the left first, then the completion; "
                   "keep_start keeps the first tokens; drop drops too-long examples.")
def validate(file: str, kind: str | None, split: str, skip_bad_rows: bool, include_ties: bool, margins: str,
             tokenizer: str | None, max_length: int | None, truncation: str) -> None:
    tok = _tokenizer(tokenizer)
    records, stats = _load(file, kind, split, include_ties, margins, tok)
    click.echo(f"file: {file}")
    click.echo(f"format: {stats.kind or 'unknown (no rows)'} ({'given' if kind else 'detected'})")
    click.echo(f"rows: {stats.rows}")
    click.echo(f"valid rows: {stats.rows - stats.bad_rows}")
    if stats.kind in ("preference", "ranking"):
        click.echo(f"groups: {len(records)}")
        click.echo(f"pairs: {stats.pairs}")
        click.echo(f"ties skipped: {stats.ties_skipped}")
    click.echo(f"bad rows: {stats.bad_rows}")
    if tok is not None and records:
        _token_report(records, stats.kind, tok, max_length, truncation)
    if stats.bad_rows:
        _print_bad_rows(stats, err=False)  # part of the report
        if not skip_bad_rows:
            raise DataCommandError(f"{stats.bad_rows} bad rows in {file} (--skip-bad-rows to skip them)")


def _token_report(records: list, kind: str, tok, max_length: int | None, truncation: str) -> None:
    """Token lengths (before truncation), and what --max-length would truncate or drop."""

    def tokenize(limit):
        if kind in ("preference", "ranking"):
            out, tstats = tokenize_preferences(records, tok, max_length=limit, truncation=truncation)
            return [len(p[k]) for g in out for p in g["pairs"] for k in ("chosen_input_ids", "rejected_input_ids")], \
                tstats, "pairs"
        if kind in ("sft", "unpaired"):
            recs = [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
            out, tstats = tokenize_sft(recs, tok, max_length=limit, truncation=truncation)
            return [len(e["input_ids"]) for e in out], tstats, "examples"
        out, tstats = tokenize_prompts(records, tok, max_length=limit)
        return [len(e["input_ids"]) for e in out], tstats, "prompts"

    try:
        lengths, _, unit = tokenize(None)
        if lengths:
            click.echo(f"tokens per sequence: max {max(lengths)}, mean {sum(lengths) / len(lengths):.1f}")
        if max_length is not None:
            _, tstats, _ = tokenize(max_length)
            click.echo(f"truncated {unit} (max length {max_length}, {truncation}): {tstats.truncated}")
            click.echo(f"dropped {unit}: {tstats.dropped}")
    except UserError as e:
        raise DataCommandError(str(e)) from None


def _convert(records: list, kind: str, to: str, include_ties: bool) -> list[dict]:
    """Records of `kind` -> rows of the target format `to` (auto: the records' own format)."""
    groups = kind in ("preference", "ranking")
    if to == "auto":
        return _as_own_format(records, kind, include_ties)
    if to in ("pairs", "preference"):
        if not groups:
            raise DataCommandError(f"cannot convert {kind} data to preference pairs; give preference or ranking data")
        return groups_to_rows(records, with_ties=include_ties)
    if to == "unpaired":
        if kind == "unpaired":
            return [dict(r) for r in records]
        if kind == "steps":
            return [{"prompt": r["prompt"], "completion": join_steps(r["completions"]), "label": _no_bad_step(r)}
                    for r in records]
        if not groups:
            raise DataCommandError(f"cannot convert {kind} data to unpaired rows; give preference, ranking or "
                                   f"unpaired data")
        return groups_to_unpaired(records)
    if to == "prompt":
        prompts = [{"prompt": g.prompt if isinstance(g, PreferenceGroup) else g["prompt"]} for g in records]
        if kind == "sft" and prompts and all(p["prompt"] in ("", []) for p in prompts):
            raise DataCommandError("SFT text rows have no prompt to extract")
        return prompts
    return _to_sft(records, kind)


def _no_bad_step(record: dict) -> bool:
    """A step record's solution is kept as good: no step labelled bad, and its outcome (when given, else the labels'
    `outcome_label`) right. A wrong step before a lucky right answer is still a bad solution."""
    return -1 not in (record["labels"] or ()) and outcome_label(record) > 0


def _as_own_format(records: list, kind: str, include_ties: bool) -> list[dict]:
    if kind == "ranking":
        return [{"prompt": g.prompt, "completions": g.completions, "ranking": g.ranking} for g in records]
    if kind == "preference":
        rows = groups_to_rows(records, with_ties=include_ties)
        if all(len(g.pairs) == 1 and g.pair_weight == 1.0 for g in records):  # plain pairs: no group columns
            rows = [{k: v for k, v in r.items() if k not in ("pair_weight", "group")} for r in rows]
        return rows
    return [_row(r) for r in records]


def _row(record: dict) -> dict:
    """A record as a row to write: without the annotations chat templating adds for tokenisation."""
    return {k: v for k, v in record.items() if k != "assistant_spans"}


def _to_sft(records: list, kind: str) -> list[dict]:
    """The preferred completion of each prompt."""
    if kind == "sft":
        return [_row(r) for r in records]
    if kind == "unpaired":
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in records if r["label"]]
    if kind == "steps":  # rejection-sampling fine-tuning data: the solutions with no bad step
        return [{"prompt": r["prompt"], "completion": join_steps(r["completions"])}
                for r in records if _no_bad_step(r)]
    if kind not in ("preference", "ranking"):
        raise DataCommandError(f"cannot convert {kind} data to SFT rows; give sft, preference, ranking, unpaired or "
                               f"steps data")
    rows = []
    for g in records:
        if g.ranking is not None:
            best = g.completions[g.ranking.index(min(g.ranking))]
        elif g.pairs:
            best = g.pairs[0].chosen
        else:
            continue
        rows.append({"prompt": g.prompt, "completion": best})
    return rows


@data.command(help="Convert IN (any supported format and file type) to OUT; the output file type comes from OUT's "
                   "suffix (.jsonl, .json, .parquet, .csv, .tsv).")
@click.argument("in_path", metavar="IN")
@click.argument("out_path", metavar="OUT")
@click.option("--to", "to", type=click.Choice(TARGETS), default="auto", show_default=True,
              help="Output records. auto: the input's normalised records (ranking stays ranking); pairs/preference: "
                   "flat TRL preference rows (prompt, chosen, rejected, margin, pair_weight, group), a ranking "
                   "becomes its K(K-1)/2 pairs; unpaired: KTO rows (chosen/best true, rejected/worst false); "
                   "prompt: the prompts; sft: prompt + the preferred completion (steps: each solution with no bad "
                   "step, its steps joined); steps to unpaired: label = no bad step.")
@read_options
def convert(in_path: str, out_path: str, to: str, kind: str | None, split: str, skip_bad_rows: bool,
            include_ties: bool, margins: str, tokenizer: str | None) -> None:
    records, stats = _load(in_path, kind, split, include_ties, margins, _tokenizer(tokenizer))
    if stats.bad_rows and not skip_bad_rows:
        _print_bad_rows(stats)
        raise DataCommandError(f"{stats.bad_rows} bad rows in {in_path}; nothing written (--skip-bad-rows to "
                               f"skip them)")
    rows = _convert(records, stats.kind, to, include_ties)
    try:
        write_rows(rows, out_path)
    except UserError as e:
        raise DataCommandError(str(e)) from None
    click.echo(f"read {stats.rows} rows ({stats.kind}) from {in_path}; wrote {len(rows)} rows to {out_path}")
    if stats.ties_skipped:
        click.echo(f"ties skipped: {stats.ties_skipped}")
    if stats.bad_rows:
        click.echo(f"bad rows skipped: {stats.bad_rows}")
        _print_bad_rows(stats)
