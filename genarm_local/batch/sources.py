"""Batch input and output beyond one JSONL file: a directory of shards, Parquet in and out, OUT in input order.

A directory is read as one file made of its *.jsonl and *.parquet files in name order: line numbers run on from
one file into the next, so ids known by their line number, and the default seeds (--seed + line), stay distinct
across shards. A Parquet record counts as one line; its null fields are keys the row does not have (Parquet gives
every record every column of the file, and every ARM of any record's "weights").

A Parquet OUT is written once, when the run ends: until then the result rows are appended to a JSONL journal beside
it (OUT.partial.jsonl), which is as crash-safe and resumable as a JSONL OUT; a rerun over a finished Parquet OUT
starts from its rows. Parquet columns: id (integers, or text when any id is text), line, text, finish_reason,
tokens, settings (a JSON string: its keys differ from row to row) and error.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.atomic import atomic_output
from ..core.errors import BatchInputError, InputNotFoundError, require
from .rows import Row, parse_object, read_jsonl, read_result_rows

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
PARQUET_INSTALL = "ray"  # the extra that brings pyarrow (Ray Data reads and writes Parquet with it)


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def read_rows(path: Path, sampling_keys: set[str]) -> list[Row]:
    """Every row of a JSONL file, a Parquet file, or a directory of them (module docstring)."""
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file")
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in INPUT_SUFFIXES and p.is_file())
        if not files:
            raise BatchInputError(f"{path} is a directory without {', '.join(INPUT_SUFFIXES)} files")
    rows: list[Row] = []
    first_line = 1
    for file in files:
        read = read_parquet if is_parquet(file) else read_jsonl
        shard, lines = read(file, sampling_keys, first_line)
        rows += shard
        first_line += lines
    return rows


def read_parquet(path: Path, sampling_keys: set[str], first_line: int = 1) -> tuple[list[Row], int]:
    """The records of one Parquet file as rows, numbered from ``first_line``, and how many there are."""
    parquet = require("pyarrow.parquet", PARQUET_INSTALL)
    try:
        records = parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise BatchInputError(f"{path} is not a readable Parquet file: {exc}") from None
    rows = [parse_object(n, _without_nulls(record), sampling_keys) for n, record in enumerate(records, first_line)]
    return rows, len(records)


def _without_nulls(record: dict) -> dict:
    record = {key: value for key, value in record.items() if value is not None}
    if isinstance(record.get("weights"), dict):
        record["weights"] = {name: alpha for name, alpha in record["weights"].items() if alpha is not None}
    return record


# ---- output --------------------------------------------------------------------------------------------------


def journal_for(output: Path, rows: list[Row]) -> Path:
    """The JSONL file result rows are appended to: OUT itself, or for a Parquet OUT its journal (seeded from a
    finished OUT, so that a rerun skips its rows)."""
    if not is_parquet(output):
        return output
    journal = output.with_name(output.name + ".partial.jsonl")
    if output.exists() and not journal.exists():
        # ids come back as text when some were text; the input row on the same line says which were integers
        by_line = {row.line: row for row in rows}
        results = read_results(output)
        for result in results:
            row = by_line.get(result["line"])
            if row is not None and str(row.id) == str(result["id"]):
                result["id"] = row.id
        with atomic_output(journal) as tmp:
            tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in results), encoding="utf-8")
    return journal


def read_results(path: Path) -> list[dict]:
    """The result rows of a Parquet OUT, as the JSONL rows they were written from."""
    parquet = require("pyarrow.parquet", PARQUET_INSTALL)
    try:
        records = parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:
        raise BatchInputError(f"{path} is not a readable Parquet file: {exc}; choose another -o") from None
    rows = []
    for record in records:
        row = {key: value for key, value in record.items() if value is not None}
        if "id" not in row or "line" not in row:
            raise BatchInputError(f"{path} was not written by genarm-local batch (no id or line column)")
        if "settings" in row:
            row["settings"] = json.loads(row["settings"])
        rows.append(row)
    return rows


def finish(output: Path, order: list[str], target: Path | None) -> None:
    """The end of a run: OUT rewritten in input order (atomically), or the Parquet OUT written from its journal and
    the journal removed. Rows of OUT that the input does not have (an earlier run over other rows) go last."""
    if not output.exists():
        return
    rows = {json.dumps(row["id"]): row for row in read_result_rows(output)}
    position = {key: index for index, key in enumerate(order)}
    ordered = sorted(rows.values(), key=lambda row: position.get(json.dumps(row["id"]), len(order)))
    if target is None:
        with atomic_output(output, force=True) as tmp:
            tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ordered), encoding="utf-8")
        return
    write_parquet(target, ordered)
    output.unlink()


def write_parquet(path: Path, rows: list[dict]) -> None:
    pyarrow = require("pyarrow", PARQUET_INSTALL)
    parquet = require("pyarrow.parquet", PARQUET_INSTALL)
    integer_ids = all(isinstance(row["id"], int) for row in rows)
    schema = pyarrow.schema(
        [
            ("id", pyarrow.int64() if integer_ids and rows else pyarrow.string()),
            ("line", pyarrow.int64()),
            ("text", pyarrow.string()),
            ("finish_reason", pyarrow.string()),
            ("tokens", pyarrow.list_(pyarrow.int64())),
            ("settings", pyarrow.string()),
            ("error", pyarrow.string()),
        ]
    )
    records = [dict(row, id=row["id"] if integer_ids else str(row["id"])) for row in rows]
    records = [dict(row, settings=json.dumps(row["settings"])) if "settings" in row else row for row in records]
    table = pyarrow.Table.from_pylist(records, schema=schema)
    with atomic_output(path, force=True) as tmp:
        parquet.write_table(table, tmp)
