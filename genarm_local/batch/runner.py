"""The batch runner: a JSONL file of prompts → guided completions, crash-safe and resumable (`genarm-local batch`).

Input rows are rows.py's. Output rows: id, line, text, finish_reason, tokens and the settings used; or id, line
and error. OUT ends in input order.

Same input, same text. The rows are cut into groups by their position in the input: rows 1..B, B+1..2B, ... (B =
--batch-size), each group generated together (GuidedModel.generate_many: the group's rows join the decode loop
in one step and share its steps until each ends), every row with its own seed — its "seed", or --seed + its line
number. So which rows share a step is a function of the input alone, and a run writes the same text under load,
after a kill and a rerun, and on Ray with any number of replicas (ray_backend.py runs the same groups).

Crash safety: each group's rows are appended, flushed and fsynced, so OUT only ever loses the group being written;
a torn last line is cut off on the next run. Rerunning the same command redoes every group with a row missing from
OUT, whole, and writes only its missing rows.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.api import GuidedModel
from ..core.atomic import atomic_output
from ..core.errors import BatchInputError, GenArmError, InvalidOptionError
from ..core.requests import prepare
from .rows import Row
from .sources import journal_for, read_rows


def read_input(path: Path, sampling_keys: set[str]) -> list[Row]:
    """Every row of IN (a JSONL file, a Parquet file, or a directory of them read as one file: see sources.py);
    refuses an unreadable file or duplicate ids before any work is done."""
    rows = read_rows(path, sampling_keys)
    first: dict[str, int] = {}
    for row in rows:
        if row.key in first:
            raise BatchInputError(
                f"{path}: id {row.id!r} on lines {first[row.key]} and {row.line}; ids must be unique (a row without "
                "an id is known by its line number)"
            )
        first[row.key] = row.line
    return rows


def recover_output(path: Path, retry_failed: bool) -> dict[str, dict]:
    """The rows OUT already holds, by id key. A torn last line (the process died mid-write) is cut off; an
    unparsable line anywhere else means OUT is not ours, and is an error. With ``retry_failed`` error rows are
    dropped from OUT (atomically) so that they are redone."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    rows: dict[str, dict] = {}
    lines = data.split(b"\n")  # the last item is b"" when the file ends with a newline
    offset = 0
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            offset += len(raw) + 1
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError
        except ValueError:
            if any(rest.strip() for rest in lines[number:]):
                raise BatchInputError(
                    f"{path} line {number} is not a result row; was it written by another program? Choose another "
                    "-o, or remove the line"
                ) from None
            with open(path, "r+b") as sink:  # the torn last line of a killed run: cut it off, its row is redone
                sink.truncate(offset)
            break
        rows[json.dumps(row["id"])] = row
        offset += len(raw) + 1
    else:
        if data and not data.endswith(b"\n"):  # a complete last row that lost only its newline
            with open(path, "ab") as sink:
                sink.write(b"\n")
    if retry_failed and any("error" in row for row in rows.values()):
        rows = {key: row for key, row in rows.items() if "error" not in row}
        with atomic_output(path, force=True) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()), encoding="utf-8")
    return rows


class Sink:
    """OUT opened for appending, counting the rows written as done or failed. Rows written together (a group) share
    one flush and fsync: they are on disk before the next group starts; a kill mid-write leaves a torn last line,
    which recover_output cuts off."""

    def __init__(self, path: Path):
        self.done = self.failed = 0
        self._file = open(path, "a", encoding="utf-8")  # closed by close()

    def write_all(self, rows: list[dict]) -> None:
        self._file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self._file.flush()
        os.fsync(self._file.fileno())
        for row in rows:
            if "error" in row:
                self.failed += 1
            else:
                self.done += 1

    def close(self) -> None:
        self._file.close()


def result_row(row: Row, request, result) -> dict:
    """The output row of a generated input row (or its error row)."""
    if result.error is not None:
        return {"id": row.id, "line": row.line, "error": f"line {row.line}: {result.error}"}
    settings = dict(request.options, seed=request.config.seed, weights=request.weights)
    return {
        "id": row.id,
        "line": row.line,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "tokens": result.tokens,
        "settings": settings,
    }


def run_group(rows: list[Row], model: GuidedModel, defaults: dict) -> list[dict]:
    """The output rows of one group, in input order: a row that did not parse or validate is its error row, the
    others are generated together (GuidedModel.generate_many). Each row's seed: its "seed", else the default + its
    line number."""
    out: dict[int, dict] = {}
    requests = []
    for row in rows:
        if row.error is None:
            options = dict(defaults, **row.options)
            if "seed" not in row.options:
                options["seed"] = defaults["seed"] + row.line
            try:
                requests.append((row, prepare(model, prompt=row.prompt, messages=row.messages, weights=row.weights,
                                              options=options)))  # fmt: skip
                continue
            except GenArmError as exc:
                row.error = f"line {row.line}: {exc}"
        out[row.line] = {"id": row.id, "line": row.line, "error": row.error}
    results = model.generate_many([request for _, request in requests]) if requests else []
    for (row, request), result in zip(requests, results, strict=True):
        out[row.line] = result_row(row, request, result)
    return [out[row.line] for row in rows]


@dataclass
class Plan:
    """What a run has to do, known before any model loads: the input's groups, and which rows OUT already has."""

    output: Path  # where result rows are appended: OUT, or the journal beside a Parquet OUT (sources.py)
    rows: list[Row]  # every input row, in input order
    done: set[str]  # the id keys of the rows OUT already holds
    batch_size: int
    earlier_failures: int  # error rows OUT keeps (not redone without retry_failed)
    target: Path | None = None  # the file -o named, when it is not ``output`` (Parquet, written at the end)

    @property
    def groups(self) -> list[list[Row]]:
        """The groups with a row still missing from OUT (each is redone whole)."""
        size = self.batch_size
        groups = [self.rows[first : first + size] for first in range(0, len(self.rows), size)]
        return [group for group in groups if any(row.key not in self.done for row in group)]

    @property
    def todo(self) -> int:
        return sum(1 for row in self.rows if row.key not in self.done)

    @property
    def skipped(self) -> int:
        return len(self.rows) - self.todo

    @property
    def order(self) -> list[str]:
        return [row.key for row in self.rows]


def plan(input: Path, output: Path, sampling_keys: set[str], batch_size: int, retry_failed: bool = False) -> Plan:
    if batch_size < 1:
        raise InvalidOptionError(f"--batch-size must be at least 1, got {batch_size}")
    rows = read_input(input, sampling_keys)
    if output.is_dir() or not output.parent.is_dir():
        raise InvalidOptionError(f"-o {output}: give a file in an existing directory")
    journal = journal_for(output, rows)
    finished = recover_output(journal, retry_failed)
    done = {row.key for row in rows if row.key in finished}
    earlier_failures = sum(1 for row in rows if "error" in finished.get(row.key, {}))
    target = output if journal != output else None
    return Plan(journal, rows, done, batch_size, earlier_failures, target)


def missing(rows: list[dict], written: set[str]) -> list[dict]:
    """The rows of a group's output that OUT does not hold yet (a group redone after a kill writes only those)."""
    return [row for row in rows if json.dumps(row["id"]) not in written]


def run(model: GuidedModel, plan: Plan, defaults: dict, progress=None) -> Sink:
    """Generate every group of ``plan`` into its OUT (appended group by group); returns the sink with its counts."""
    progress = progress if progress is not None else progress_bar(0, plan.output, False)
    written = set(plan.done)
    sink = Sink(plan.output)
    try:
        for group in plan.groups:
            rows = missing(run_group(group, model, defaults), written)
            sink.write_all(rows)
            written.update(json.dumps(row["id"]) for row in rows)
            progress.update(len(rows))
    finally:
        sink.close()
    return sink


def progress_bar(total: int, output: Path, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=output.name, unit="row", disable=not enabled or total == 0, file=sys.stderr)
