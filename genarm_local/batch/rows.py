"""Batch input rows: one JSON line (or Parquet record) → Row, checked without loading a model.

Input rows: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}, optionally "weights" ({ARM name: α})
and any sampling option ("max_tokens", "temperature", "seed", "stop", ...). A row without an id is known by its
line number. Anything wrong with a row becomes its error, not an exception, so one bad line never stops a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import BatchInputError, InvalidOptionError
from ..core.requests import check_option_types, check_weights


def split_lines(text: str) -> list[str]:
    """JSONL lines: split on "\n" only. str.splitlines would also cut at U+2028, U+0085, U+000B, U+001C... which a
    JSON string may hold raw (json.dumps with ensure_ascii=False writes them as they are)."""
    return text.split("\n")


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
    lines = split_lines(text)
    rows = [parse_row(n, line, sampling_keys) for n, line in enumerate(lines, first_line) if line.strip()]
    if rows and all(row.error and "not JSON" in row.error for row in rows):
        raise BatchInputError(f"{path}: no line is JSON; give a JSONL file (one JSON object per line)")
    return rows, len(lines) - (lines[-1] == "")


def read_result_rows(path: Path) -> list[dict]:
    """The result rows of a JSONL OUT (or journal) that recover_output has checked, in file order."""
    return [json.loads(line) for line in split_lines(path.read_text(encoding="utf-8")) if line.strip()]
