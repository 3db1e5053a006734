"""Chat messages → prompt text, the way the model expects them.

Which template: an explicit choice (LoadConfig.chat_template: "plain", a llama.cpp built-in name such as "chatml",
"gemma" or "llama3", a Jinja file, or Jinja source); else the model's own tokenizer.chat_template from the GGUF;
else — a pretrained base, which never learned any turn markup — a plain transcript ("User: …\\nAssistant:") that
stops at the next turn. llama.cpp's built-in templates are used only when named: picking one by architecture gave
the pretrained Gemma-3-270M the instruction-tuned model's <start_of_turn> markup, which it answers with junk.

A Jinja template is untrusted input (it travels inside downloaded GGUF files), so it never runs in this process:
template_worker.py renders it in a child process, in Jinja's immutable sandbox (no attribute walks such as
``__class__``/``__subclasses__``), under a memory limit, an output-size limit and a time limit. A hostile template
costs one clear error, never code execution, a hang or the host's memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from .errors import ChatTemplateError, InvalidOptionError
from .native import Model, apply_builtin_chat_template, block_signals, builtin_chat_templates

Message = Mapping[str, str]

PLAIN = "plain"
RENDER_SECONDS = 2.0  # one render; the worker's start-up (a Python interpreter + Jinja) is not counted
START_SECONDS = 30.0


@dataclass(frozen=True)
class RenderedChat:
    text: str
    add_bos: bool  # whether tokenizing should add BOS (a Jinja template writes its own, like transformers')
    stop_at_turns: bool = False  # no end-of-turn token: the reply ends where a new line opens with "Name:"


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved chat template: ``kind`` is "plain", "builtin" (llama.cpp's own, by name) or "jinja"."""

    kind: str
    name: str  # what to call it in messages: "plain", the built-in's name, the file, or "the GGUF's own"
    source: str | None = None

    def render(self, model: Model, messages: Sequence[Message], add_generation_prompt: bool = True) -> RenderedChat:
        check_messages(messages)
        if self.kind == PLAIN:
            return RenderedChat(render_plain(messages, add_generation_prompt), True, stop_at_turns=True)
        if self.kind == "builtin":
            return RenderedChat(render_builtin(self.name, messages, add_generation_prompt), True)
        context = {
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": model.bos_text,
            "eos_token": model.eos_text,
        }
        return RenderedChat(_worker().render(self.source, context, self.name), False)


def resolve_template(choice: str | None, model: Model) -> ChatTemplate:
    """The template ``choice`` names (see the module docstring), or the model's default."""
    if choice is None:
        own = model.chat_template
        if own:
            return ChatTemplate("jinja", f"the chat template of {model.path}", _checked(own, model))
        return ChatTemplate(PLAIN, PLAIN)
    if choice == PLAIN:
        return ChatTemplate(PLAIN, PLAIN)
    if choice in builtin_chat_templates():
        return ChatTemplate("builtin", choice)
    if "{{" in choice or "{%" in choice:
        return ChatTemplate("jinja", "the given chat template", _checked(choice, model))
    path = Path(choice)
    if path.is_file():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatTemplateError(f"chat template {path}: cannot read it as UTF-8 text ({exc})") from None
        return ChatTemplate("jinja", str(path), _checked(source, model))
    names = ", ".join([PLAIN, *builtin_chat_templates()])
    raise ChatTemplateError(f"chat template {choice!r}: no such file and no template of that name (names: {names})")


def _checked(source: str, model: Model) -> str:
    """Refuse a template that is not even valid Jinja now, at load time (parsing runs no template code)."""
    from jinja2 import Environment
    from jinja2.exceptions import TemplateSyntaxError

    try:
        Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat template for {model.path} is not valid Jinja: {exc} (line {exc.lineno})"
        ) from None
    return source


# No system message: some real templates refuse one.
PROBE = (
    {"role": "user", "content": "Hello."},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Tell me a story."},
)


def check_messages(messages: Sequence[Message]) -> None:
    for message in messages:
        if (
            not isinstance(message, Mapping)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise InvalidOptionError(f"a chat message needs a string 'role' and 'content', got {message!r}")


# The plain transcript: what a pretrained model has seen in dialogue text. The next speaker's label ends the reply
# (SamplingConfig.stop_at_turns): "User:", but also whoever else the model lets speak ("Student:", "Q:").
def render_plain(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    text = "".join(f"{m['role'].capitalize()}: {m['content'].strip()}\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


def render_builtin(name: str, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """llama.cpp's own rendering of a named built-in template."""
    return apply_builtin_chat_template(name, [(m["role"], m["content"]) for m in messages], add_generation_prompt)


# ---- the Jinja worker process ----------------------------------------------------------------------------------


class _Worker:
    """The client side of template_worker.py: one child process per Python process, started on first use, killed
    and restarted after a timeout. Thread-safe (one render at a time)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._reader = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="genarm-template", initializer=block_signals
        )

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        process = subprocess.Popen(
            [sys.executable, "-m", "genarm_local.core.template_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            encoding="utf-8",
        )
        if self._read(process, START_SECONDS) != {"ready": True}:
            process.kill()
            raise ChatTemplateError("could not start the chat template renderer (genarm_local.core.template_worker)")
        return process

    def _read(self, process: subprocess.Popen, timeout: float) -> dict | None:
        try:
            line = self._reader.submit(process.stdout.readline).result(timeout)
        except FutureTimeout:
            process.kill()  # readline then returns at EOF, freeing the reader thread
            process.wait()
            return None
        return json.loads(line) if line else None

    def render(self, source: str, context: dict, name: str) -> str:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._process = self._start()
            process = self._process
            try:
                process.stdin.write(json.dumps({"source": source, "context": context}) + "\n")
                process.stdin.flush()
            except OSError:
                reply = None
            else:
                reply = self._read(process, RENDER_SECONDS)
            if reply is None:
                self._process = None
                process.kill()
                raise ChatTemplateError(
                    f"{name} did not finish rendering within {RENDER_SECONDS:g} s (or ran out of memory); refusing it"
                )
        if "error" in reply:
            raise ChatTemplateError(f"{name} failed on these messages: {reply['error']}")
        return reply["text"]


_worker_lock = threading.Lock()
_the_worker: _Worker | None = None


def _worker() -> _Worker:
    global _the_worker
    with _worker_lock:
        if _the_worker is None:
            _the_worker = _Worker()
        return _the_worker
