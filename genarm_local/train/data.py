"""Preference data: JSONL rows → (prompt, chosen, rejected) → token ids (the loss and batches: loss.py).

Data formats, detected per file from its first row:
- TRL: {"prompt": str, "chosen": str, "rejected": str}
- HH-RLHF: {"chosen": str, "rejected": str}, full transcripts split at the last "\\n\\nAssistant:"
- chat: {"chosen": [messages], "rejected": [messages]} sharing all but the last (assistant) message, or with
  "prompt": [messages] and the replies in chosen/rejected; rendered with the model's chat template.
No torch here.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import InputNotFoundError, InvalidOptionError, PreferenceDataError, TokenizerMismatchError

HH_ASSISTANT = "\n\nAssistant:"
# Turn markers of common chat templates, written as text by data that was rendered for some model. If SRC's
# tokenizer has no such token, the data was made for another model's template (e.g. Gemma's <start_of_turn> fed
# to a ChatML model) and would train the ARM on markup it never sees at run time.
CHAT_MARKUP = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|<start_of_turn>|<end_of_turn>")


@dataclass(frozen=True)
class Pair:
    """One preference pair: strings, or for chat data lists of messages (prompt) and reply messages."""

    prompt: str | list
    chosen: str | list
    rejected: str | list
    line: int  # 1-based line in the file (row index + 1 for rows given in Python)


@dataclass
class PreferenceData:
    pairs: list[Pair]
    format: str
    source: str
    skipped: Counter = field(default_factory=Counter)  # reason -> rows


def _is_empty(value) -> bool:
    """Blank strings, and message lists that are empty or all blank."""
    if isinstance(value, list):
        return all(isinstance(m, Mapping) and _is_empty(m.get("content")) for m in value)
    return not value or (isinstance(value, str) and not value.strip())


def _messages(value, where: str) -> list:
    if not isinstance(value, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise PreferenceDataError(f"{where}: chat messages must be a list of {{'role': str, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _parse_trl(row: Mapping, where: str):
    return row["prompt"], row["chosen"], row["rejected"]


def _parse_hh(row: Mapping, where: str):
    halves = []
    for key in ("chosen", "rejected"):
        cut = row[key].rfind(HH_ASSISTANT)
        if cut < 0:
            raise PreferenceDataError(f"{where}: {key} has no {HH_ASSISTANT!r} turn (HH-RLHF transcript format)")
        cut += len(HH_ASSISTANT)
        halves.append((row[key][:cut], row[key][cut:]))
    (prompt, chosen), (other_prompt, rejected) = halves
    if prompt != other_prompt:
        raise PreferenceDataError(f"{where}: chosen and rejected transcripts differ before the last Assistant turn")
    return prompt, chosen, rejected


def _parse_chat(row: Mapping, where: str):
    chosen, rejected = _messages(row["chosen"], where), _messages(row["rejected"], where)
    if "prompt" in row:
        return _messages(row["prompt"], where), chosen, rejected
    if chosen[:-1] != rejected[:-1] or not chosen or chosen[-1]["role"] != "assistant":
        raise PreferenceDataError(
            f"{where}: chosen and rejected must be the same conversation up to a last, assistant message"
        )
    return chosen[:-1], chosen[-1:], rejected[-1:]


# format -> (required keys and their type, parser)
FORMATS: dict[str, tuple[dict[str, type], Callable]] = {
    "trl": ({"prompt": str, "chosen": str, "rejected": str}, _parse_trl),
    "hh": ({"chosen": str, "rejected": str}, _parse_hh),
    "chat": ({"chosen": list, "rejected": list}, _parse_chat),
}
FORMAT_NAMES = {"trl": "TRL {prompt, chosen, rejected}", "hh": "HH-RLHF {chosen, rejected}", "chat": "chat messages"}


def detect_format(row: Mapping) -> str | None:
    if isinstance(row.get("chosen"), list):
        return "chat"
    if "prompt" in row:
        return "trl"
    if isinstance(row.get("chosen"), str):
        return "hh"
    return None


def pairs_from_rows(rows: Iterable[Mapping] | Iterable[tuple[int, Mapping]], source: str = "rows") -> PreferenceData:
    """Preference pairs from parsed rows (dicts, or (line number, dict)). Rows with an empty field or chosen ==
    rejected are skipped and counted; a row of another format than the first is an error naming its line."""
    pairs: list[Pair] = []
    skipped: Counter = Counter()
    fmt = first_line = None
    for index, item in enumerate(rows):
        line, row = item if isinstance(item, tuple) else (index + 1, item)
        where = f"{source}:{line}"
        if not isinstance(row, Mapping):
            raise PreferenceDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if fmt is None:
            fmt, first_line = detect_format(row), line
            if fmt is None:
                raise PreferenceDataError(
                    f"{where}: unrecognized preference format (keys {sorted(row)}); expected one of: "
                    + "; ".join(FORMAT_NAMES.values())
                )
        keys, parse = FORMATS[fmt]
        for key, kind in keys.items():
            if key not in row or not isinstance(row[key], kind) and row[key] is not None:
                raise PreferenceDataError(
                    f"{where}: expected {FORMAT_NAMES[fmt]} like line {first_line}, but {key!r} is "
                    + ("missing" if key not in row else f"a {type(row[key]).__name__}")
                )
        if any(_is_empty(row[key]) for key in keys):
            skipped["empty field"] += 1
            continue
        prompt, chosen, rejected = parse(row, where)
        if chosen == rejected:
            skipped["chosen == rejected"] += 1
            continue
        if _is_empty(prompt) or _is_empty(chosen) or _is_empty(rejected):
            skipped["empty field"] += 1
            continue
        pairs.append(Pair(prompt, chosen, rejected, line))
    if not pairs:
        if not skipped:
            raise PreferenceDataError(f"{source}: no preference rows")
        detail = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
        raise PreferenceDataError(f"{source}: every row was skipped ({detail}); nothing to train on")
    return PreferenceData(pairs, fmt, source, skipped)


def read_jsonl(path: str | Path) -> list[tuple[int, object]]:
    """(line number, value) for every non-blank line; malformed JSON is an error naming the line."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such data file")
    if not path.is_file():
        raise PreferenceDataError(f"{path} is not a file; give a JSONL file of preference pairs")
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                rows.append((number, json.loads(text)))
            except json.JSONDecodeError as exc:
                raise PreferenceDataError(f"{path}:{number}: malformed JSON ({exc.msg})") from exc
    if not rows:
        raise PreferenceDataError(f"{path} is empty; expected one JSON preference pair per line")
    return rows


def load_preferences(data: str | Path | Sequence[Mapping]) -> PreferenceData:
    """Pairs from a JSONL path or from rows given in Python."""
    if isinstance(data, (str, Path)):
        return pairs_from_rows(read_jsonl(data), source=str(data))
    return pairs_from_rows(data)


# ---- pairs → token ids ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


Render = Callable[[list, bool], str]  # (messages, add_generation_prompt) -> text


def unknown_markup(text: str, vocab: Mapping[str, int]) -> str | None:
    """The first chat-template marker in ``text`` that is not a token of ``vocab`` (see CHAT_MARKUP), if any."""
    return next((marker for marker in CHAT_MARKUP.findall(text) if marker not in vocab), None)


def check_chat_markup(data: PreferenceData, vocab: Mapping[str, int], model: str) -> None:
    """Refuse string data written in another model's chat markup."""
    if data.format == "chat":
        return
    for pair in data.pairs:
        for text in (pair.prompt, pair.chosen, pair.rejected):
            marker = unknown_markup(text, vocab)
            if marker:
                raise TokenizerMismatchError(
                    f"{data.source}:{pair.line}: the data uses chat markup {marker!r} that the tokenizer of "
                    f"{model} does not have as a token; it was rendered for another model's chat template — "
                    "render it with this model's template, or give chat-style rows"
                )


def truncate(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int,
    max_prompt_length: int,
    bos_id: int | None,
) -> TokenizedPair:
    """Fit prompt + longer response into max_length: first keep only the last max_prompt_length prompt tokens (and
    a leading BOS), then cut both responses at the end."""
    if len(prompt) + max(len(chosen), len(rejected)) > max_length and len(prompt) > max_prompt_length:
        keep_bos = bos_id is not None and prompt[0] == bos_id
        prompt = prompt[:1] * keep_bos + prompt[len(prompt) - max_prompt_length + keep_bos :]
    room = max_length - len(prompt)
    return TokenizedPair(prompt, chosen[:room], rejected[:room])


def tokenize_pairs(
    data: PreferenceData,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    render: Render | None = None,
    model: str = "the model",
    eos: bool = True,
) -> list[TokenizedPair]:
    """Token ids of every pair, truncated (see ``truncate``). BOS is added unless the text starts with it (chat
    templates write their own); string responses end with EOS (unless ``eos`` is false), chat replies with the
    template's end of turn."""
    if max_prompt_length >= max_length:
        raise InvalidOptionError(f"--max-prompt-length {max_prompt_length} must be below --max-length {max_length}")
    vocab = tokenizer.get_vocab()
    check_chat_markup(data, vocab, model)
    bos_text, bos_id, eos_id = tokenizer.bos_token, tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(text: str, prompt: bool) -> list[int]:
        add_bos = prompt and not (bos_text and text.startswith(bos_text))
        return tokenizer(text, add_special_tokens=add_bos)["input_ids"]

    chat = data.format == "chat"
    if chat and render is None:
        raise TokenizerMismatchError(
            f"{data.source} holds chat messages but {model} has no chat template to render them; give TRL-style "
            "prompt/chosen/rejected strings instead"
        )
    out = []
    for pair in data.pairs:
        if chat:
            prompt = render(pair.prompt, True)
            marker = unknown_markup(prompt, vocab)
            if marker:
                raise TokenizerMismatchError(
                    f"the chat template of {model} writes {marker!r}, which its tokenizer does not have as a token: "
                    "the template and the tokenizer do not belong together"
                )
            replies = []
            for reply in (pair.chosen, pair.rejected):
                full = render(pair.prompt + reply, False)
                if not full.startswith(prompt):
                    raise TokenizerMismatchError(
                        f"{data.source}:{pair.line}: the chat template of {model} does not render the prompt as the "
                        "start of the conversation, so the reply cannot be told apart from it"
                    )
                replies.append(encode(full[len(prompt) :], False))
            chosen, rejected = replies
        else:
            prompt = pair.prompt
            end = [eos_id] if eos and eos_id is not None else []
            chosen, rejected = encode(pair.chosen, False) + end, encode(pair.rejected, False) + end
        prompt_ids = encode(prompt, True)
        if not prompt_ids:
            raise PreferenceDataError(f"{data.source}:{pair.line}: the prompt has no tokens")
        out.append(truncate(prompt_ids, chosen, rejected, max_length, max_prompt_length, bos_id))
    return out


def load_tokenizer(source: Path):
    transformers = __import__("transformers")
    if source.is_file():
        return transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    return transformers.AutoTokenizer.from_pretrained(str(source))


def chat_renderer(tokenizer) -> Render:
    """How chat data becomes text, as the engine will render it by default: the model's own template, else (a
    pretrained base without one) the plain User:/Assistant: transcript."""
    if tokenizer.chat_template:
        return lambda messages, generation: tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
    from ..core.chat_template import render_plain

    return render_plain
