"""The batch runner: a JSONL file of prompts → guided completions, crash-safe and resumable (`genarm-local batch`).

Input rows: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}, optionally "weights" ({ARM name: α})
and any sampling option ("max_tokens", "temperature", "seed", "stop", ...). A row without an id is known by its
line number. Output rows: id, line, text, finish_reason, tokens and the settings used; or id, line and error.

Crash safety: each finished row is appended, flushed and fsynced, so OUT only ever loses the row being written;
a torn last line is cut off on the next run and that row redone. Rerunning the same command skips every id
already in OUT. Rows with equal settings share GuidedModel.generate_batch calls (several sequences per llama.cpp
batch); every row has its own seed — its "seed", or --seed + its line number — so a resumed run writes the
same text as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.api import GuidedModel
from ..core.atomic import atomic_output
from ..core.errors import BatchInputError, GenArmError, InvalidOptionError
from ..core.requests import Prepared, check_option_types, check_weights, prepare

# Sampling options a row may set; the rest of SamplingConfig comes from the command line only.
ROW_KEYS = {"id", "prompt", "messages", "weights"}
NOT_PER_ROW = {"logprobs"}


@dataclass
class Row:
    line: int
    id: object
    prompt: str | None = None
    messages: list | None = None
    weights: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> str:
        return json.dumps(self.id)


def parse_row(line: int, text: str, sampling_keys: set[str]) -> Row:
    """One input line → Row; anything wrong with it becomes the row's error, not an exception."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Row(line, line, error=f"line {line}: not JSON ({exc.msg} at column {exc.colno})")
    return parse_object(line, data, sampling_keys)


def parse_object(line: int, data: object, sampling_keys: set[str]) -> Row:
    """One decoded input record (a JSON line, a Parquet row) → Row, checked as parse_row says."""
    if not isinstance(data, dict):
        return Row(line, line, error=f"line {line}: expected a JSON object, got {type(data).__name__}")
    row = Row(line, data.get("id", line))
    if isinstance(row.id, bool) or not isinstance(row.id, (str, int)):
        row.id, row.error = line, f"line {line}: id must be a string or an integer, got {data['id']!r}"
        return row
    unknown = sorted(set(data) - ROW_KEYS - sampling_keys)
    has_prompt, has_messages = isinstance(data.get("prompt"), str), isinstance(data.get("messages"), list)
    if unknown:
        row.error = f"unknown key(s) {', '.join(unknown)}; a row may have {', '.join(sorted(ROW_KEYS | sampling_keys))}"
    elif has_prompt == has_messages:
        row.error = 'a row needs either "prompt" (a string) or "messages" (a list of {"role", "content"})'
    else:
        row.prompt, row.messages = data.get("prompt"), data.get("messages")
        row.options = {key: data[key] for key in sampling_keys if key in data}
        try:
            row.weights = check_weights(data.get("weights"))
            check_option_types(row.options)
        except InvalidOptionError as exc:
            row.error = str(exc)
    if row.error and not row.error.startswith("line"):
        row.error = f"line {line}: {row.error}"
    return row


def read_jsonl(path: Path, sampling_keys: set[str], first_line: int = 1) -> tuple[list[Row], int]:
    """The rows of one JSONL file, numbered from ``first_line``, and how many lines it has."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BatchInputError(f"{path} is not UTF-8 text (byte {exc.start}); give a JSONL file") from None
    except OSError as exc:
        raise BatchInputError(f"cannot read {path}: {exc.strerror}") from None
    # split on "\n" only: str.splitlines would also cut at U+2028 and friends, which JSON strings may hold raw
    lines = text.split("\n")
    rows = [parse_row(n, line, sampling_keys) for n, line in enumerate(lines, first_line) if line.strip()]
    if rows and all(row.error and "not JSON" in row.error for row in rows):
        raise BatchInputError(f"{path}: no line is JSON; give a JSONL file (one JSON object per line)")
    return rows, len(lines) - (lines[-1] == "")


def read_input(path: Path, sampling_keys: set[str]) -> list[Row]:
    """Every row of IN (a JSONL file, a Parquet file, or a directory of them read as one file: see sources.py);
    refuses an unreadable file or duplicate ids before any work is done."""
    from .sources import read_rows

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


class RowSink:
    """Where finished result rows go, counted as done or failed."""

    def __init__(self) -> None:
        self.done = self.failed = 0

    def write(self, row: dict) -> None:
        self.write_all([row])

    def write_all(self, rows: list[dict]) -> None:
        self.put(rows)
        for row in rows:
            if "error" in row:
                self.failed += 1
            else:
                self.done += 1

    def error(self, row: Row, message: str) -> None:
        self.write({"id": row.id, "line": row.line, "error": message})

    def put(self, rows: list[dict]) -> None:
        raise NotImplementedError


class Sink(RowSink):
    """OUT opened for appending; rows are on disk (flushed and fsynced) before the next ones start. Rows written
    together (a chunk back from a Ray replica) share one fsync; a kill mid-write leaves a torn last line, which
    recover_output cuts off."""

    def __init__(self, path: Path):
        super().__init__()
        self._file = open(path, "a", encoding="utf-8")  # closed by close()

    def put(self, rows: list[dict]) -> None:
        self._file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class MemorySink(RowSink):
    """Result rows kept in a list (a Ray replica hands them back to the driver, which writes OUT)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    def put(self, rows: list[dict]) -> None:
        self.rows += rows


@dataclass
class Job:
    """A row ready to run: its validated request and its seed."""

    row: Row
    request: Prepared

    @property
    def seed(self) -> int:
        return self.request.config.seed


def prepare_row(row: Row, model: GuidedModel, defaults: dict) -> Job:
    """Validate a row against the loaded model. Its seed: the row's own "seed", else the default + line number."""
    options = dict(defaults, **row.options)
    if "seed" not in row.options:
        options["seed"] = defaults["seed"] + row.line
    request = prepare(model, prompt=row.prompt, messages=row.messages, weights=row.weights, options=options)
    return Job(row, request)


def run_jobs(jobs: list[Job], model: GuidedModel, sink: RowSink, batch_size: int, progress) -> None:
    """Rows with equal settings go through generate_batch together, batch_size at a time."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.request.group, []).append(job)
    generated, start = 0, time.perf_counter()
    for group in groups.values():
        for first in range(0, len(group), batch_size):
            chunk = group[first : first + batch_size]
            for job, result in zip(chunk, generate_chunk(chunk, model), strict=True):
                if isinstance(result, str):
                    sink.error(job.row, result)
                    continue
                generated += len(result.tokens)
                settings = dict(job.request.options, seed=job.seed, weights=job.request.weights)
                sink.write(
                    {
                        "id": job.row.id,
                        "line": job.row.line,
                        "text": result.text,
                        "finish_reason": result.finish_reason,
                        "tokens": result.tokens,
                        "settings": settings,
                    }
                )
            progress.update(len(chunk))
            progress.set_postfix_str(f"{generated / (time.perf_counter() - start):.1f} tok/s", refresh=False)


def generate_chunk(chunk: list[Job], model: GuidedModel) -> list:
    """GenerationResults for a chunk; if the batch fails, each row alone, so one bad row fails only itself."""
    first = chunk[0].request
    run = lambda jobs: model.generate_batch(  # noqa: E731
        [job.request.tokens for job in jobs], weights=first.weights, seeds=[job.seed for job in jobs], **first.options
    )
    try:
        return run(chunk)
    except GenArmError as exc:
        if len(chunk) == 1:
            return [str(exc)]
    results = []
    for job in chunk:
        try:
            results += run([job])
        except GenArmError as exc:
            results.append(str(exc))
    return results


@dataclass
class Plan:
    """What a run has to do, known before any model loads: the rows still missing from OUT."""

    output: Path  # where result rows are appended: OUT, or the journal beside a Parquet OUT (sources.py)
    todo: list[Row]
    skipped: int  # rows already in OUT
    earlier_failures: int  # error rows OUT keeps (not redone without retry_failed)
    order: list[str] = field(default_factory=list)  # every input row's id key, in input order
    target: Path | None = None  # the file -o named, when it is not ``output`` (Parquet, written at the end)


def plan(input: Path, output: Path, sampling_keys: set[str], retry_failed: bool = False) -> Plan:
    from .sources import journal_for

    rows = read_input(input, sampling_keys)
    if output.is_dir() or not output.parent.is_dir():
        raise InvalidOptionError(f"-o {output}: give a file in an existing directory")
    journal = journal_for(output, rows)
    finished = recover_output(journal, retry_failed)
    todo = [row for row in rows if row.key not in finished]
    earlier_failures = sum(1 for row in rows if "error" in finished.get(row.key, {}))
    target = output if journal != output else None
    return Plan(journal, todo, len(rows) - len(todo), earlier_failures, [row.key for row in rows], target)


def run(model: GuidedModel, plan: Plan, defaults: dict, batch_size: int = 8, progress=None) -> Sink:
    """Generate every row of ``plan`` into its OUT (appended row by row); returns the sink with its counts."""
    if batch_size < 1:
        raise InvalidOptionError(f"--batch-size must be at least 1, got {batch_size}")
    progress = progress if progress is not None else progress_bar(0, plan.output, False)
    sink = Sink(plan.output)
    try:
        run_rows(plan.todo, model, defaults, sink, batch_size, progress)
    finally:
        sink.close()
    return sink


def run_rows(rows: list[Row], model: GuidedModel, defaults: dict, sink: RowSink, batch_size: int, progress) -> None:
    """Every row into ``sink``: a row that fails to parse or validate is an error row, the rest are generated."""
    jobs = []
    for row in rows:
        if row.error is None:
            try:
                jobs.append(prepare_row(row, model, defaults))
                continue
            except GenArmError as exc:
                row.error = f"line {row.line}: {exc}"
        sink.error(row, row.error)
        progress.update(1)
    run_jobs(jobs, model, sink, batch_size, progress)


def progress_bar(total: int, output: Path, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=output.name, unit="row", disable=not enabled or total == 0, file=sys.stderr)
