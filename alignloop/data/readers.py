"""Read rows from JSONL, JSON, Parquet, CSV/TSV and Hugging Face `datasets`; write them back out.

Every row is a `Row`: a plain dict that also knows where it came from (`row.where`, e.g. ``"pairs.jsonl line 7"``)
so that later errors can name the file, line and field. Lines are 1-based for JSONL and CSV (the CSV header is line 1);
JSON, Parquet and HF datasets rows are named by their 0-based index.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from alignloop.data.errors import DataError, DataStats, raise_or_skip

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
            ".csv": "csv", ".tsv": "tsv"}


class Row(dict):
    """A row (a dict of column -> value) with its location in `where`. `from_text` is True for CSV rows, whose cells
    are all strings (lists such as `messages` are then expected as JSON text)."""

    def __init__(self, data: dict, where: str, from_text: bool = False, error: str | None = None):
        super().__init__(data)
        self.where = where
        self.from_text = from_text
        self.error = error  # set on a placeholder for a row that could not be read (e.g. invalid JSON)


def type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for error messages."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def read_rows(path_or_id: str | os.PathLike, split: str = "train", skip_bad_rows: bool = False,
              stats: DataStats | None = None) -> list[Row]:
    """Read all rows of a file (by suffix: .jsonl/.ndjson, .json, .parquet/.pq, .csv, .tsv), a `datasets`
    `save_to_disk` folder, a Hugging Face hub dataset id (`datasets.load_dataset(id, split=split)`), or rows already
    in memory (a list of dicts or a `datasets.Dataset`; named "row i" in errors).
    Invalid JSON lines and rows that are not objects are bad rows: a `DataError` names the first, unless
    `skip_bad_rows` (then they are counted in `stats.bad_rows`)."""
    stats = stats if stats is not None else DataStats()
    rows = []
    for row in read_raw_rows(path_or_id, split, stats):
        if row.error is not None:
            stats.add_error(row.error)
        else:
            rows.append(row)
    raise_or_skip(stats, skip_bad_rows)
    return rows


def read_raw_rows(path_or_id: str | os.PathLike, split: str, stats: DataStats) -> list[Row]:
    """Read rows (counted in stats.rows); unreadable ones are placeholders with `.error` set, in file order.
    Also takes rows already in memory: a list of dicts or a `datasets.Dataset` (rows named "row i")."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        rows: list[Row] = []
        for i, obj in enumerate(path_or_id):
            _add(rows, obj, getattr(obj, "where", f"row {i}"), stats, getattr(obj, "from_text", False))
        return rows
    name = str(path_or_id)
    path = Path(path_or_id)
    if path.is_dir():
        return _read_hf_disk(path, name, split, stats)
    fmt = SUFFIXES.get(path.suffix.lower())
    if not path.exists():
        if fmt is None and not name.startswith((".", "/")) and name.count("/") <= 1:
            return _read_hf_hub(name, split, stats)
        raise DataError(f"{name}: no such file or folder")
    if fmt is None:
        raise DataError(f"{name}: unknown file type {path.suffix!r}; expected one of "
                        f"{', '.join(sorted(SUFFIXES))}, or a datasets save_to_disk folder")
    reader = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv,
              "tsv": _read_csv}[fmt]
    try:
        return reader(path, name, stats)
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except csv.Error as e:
        raise DataError(f"{name}: unreadable CSV ({e})") from None


def _add(rows: list[Row], obj: Any, where: str, stats: DataStats, from_text: bool = False) -> None:
    stats.rows += 1
    if not isinstance(obj, dict):
        rows.append(Row({}, where, error=f"{where}: expected an object (a row of named fields), got {type_name(obj)}"))
        return
    rows.append(Row(obj, where, from_text))


def _read_jsonl(path: Path, name: str, stats: DataStats) -> list[Row]:
    rows: list[Row] = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{name} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                stats.rows += 1
                rows.append(Row({}, where, error=f"{where}: invalid JSON ({e.msg} at column {e.colno})"))
                continue
            _add(rows, obj, where, stats)
    return rows


def _read_json(path: Path, name: str, stats: DataStats) -> list[Row]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            return _read_jsonl(path, name, stats)
        raise DataError(f"{name}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of objects or {{\"data\": [...]}}, got {type_name(data)}")
    rows: list[Row] = []
    for i, obj in enumerate(data):
        _add(rows, obj, f"{name} index {i}", stats)
    return rows


def _read_parquet(path: Path, name: str, stats: DataStats) -> list[Row]:
    import pyarrow.parquet as pq  # noqa: PLC0415 - slow import: only for this source type

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"{name}: not a readable Parquet file ({e})") from None
    rows: list[Row] = []
    for i, obj in enumerate(table.to_pylist()):
        _add(rows, obj, f"{name} index {i}", stats)
    return rows


def _read_csv(path: Path, name: str, stats: DataStats) -> list[Row]:
    rows: list[Row] = []
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return rows
        start = reader.line_num + 1
        for cells in reader:
            where = f"{name} line {start}"
            start = reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            stats.rows += 1
            if len(cells) != len(header):
                rows.append(Row({}, where, error=f"{where}: expected {len(header)} cells (columns "
                                                 f"{', '.join(header)}), got {len(cells)}"))
                continue
            rows.append(Row(dict(zip(header, cells, strict=True)), where, from_text=True))
    return rows


def _from_dataset(ds, name: str, stats: DataStats) -> list[Row]:
    rows: list[Row] = []
    for i, obj in enumerate(ds):
        _add(rows, dict(obj), f"{name} index {i}", stats)
    return rows


def _pick_split(ds, name: str, split: str):
    from datasets import DatasetDict  # noqa: PLC0415 - slow import: only for this source type

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; it has {', '.join(ds)}")
        return ds[split]
    return ds


def _read_hf_disk(path: Path, name: str, split: str, stats: DataStats) -> list[Row]:
    import datasets  # noqa: PLC0415 - slow import: only for this source type

    if not any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        raise DataError(f"{name}: a folder, but not a datasets save_to_disk folder (no dataset_info.json or "
                        f"dataset_dict.json)")
    return _from_dataset(_pick_split(datasets.load_from_disk(str(path)), name, split), name, stats)


def _read_hf_hub(name: str, split: str, stats: DataStats) -> list[Row]:  # pragma: no cover - needs the network
    import datasets  # noqa: PLC0415 - slow import: only for this source type

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{name}: not a file, and not loadable as a Hugging Face dataset ({e})") from None
    return _from_dataset(ds, name, stats)


def write_rows(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write rows to .jsonl/.json/.parquet/.csv/.tsv (by suffix). In CSV, lists and objects are written as JSON text
    (which `read_rows` reads back). The file is written beside its destination and renamed into place, so a crash
    never leaves a half-written file where a complete one was expected."""
    path = check_writable(path)
    fmt = SUFFIXES[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _write(rows, tmp, fmt)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_writable(path: str | os.PathLike) -> Path:
    """`path` as a Path when `write_rows` can write it (its suffix names a format), else a DataError naming the
    suffixes: commands check their output file before doing any work."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: cannot infer the output format from {path.suffix!r}; use one of "
                        f"{', '.join(sorted(SUFFIXES))}")
    return path


def _write(rows, path: Path, fmt: str) -> None:
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(list(rows), ensure_ascii=False, indent=1), encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow as pa  # noqa: PLC0415 - slow import: only for this source type
        import pyarrow.parquet as pq  # noqa: PLC0415 - slow import: only for this source type

        rows = list(rows)
        columns = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys: from_pylist reads the first's
        pq.write_table(pa.Table.from_pydict({c: [r.get(c) for r in rows] for c in columns}), path)
    else:
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            w.writerow(columns)
            for r in rows:
                w.writerow([_cell(r.get(c)) for c in columns])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict, bool)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
