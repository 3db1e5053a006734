"""Chat messages → prompt text, the way the model expects them.

In order of preference: an explicit template (override); the model's own tokenizer.chat_template from the GGUF,
rendered with Jinja2 in an immutable sandbox as transformers does; llama.cpp's built-in template for the
architecture (llama_chat_apply_template, e.g. "gemma" for Gemma-3 GGUFs that ship without a template); a plain
User/Assistant transcript, with a one-time notice.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from collections.abc import Mapping, Sequence

import llama_cpp as lc

from .errors import InvalidOptionError
from .native import Model

Message = Mapping[str, str]

# llama.cpp built-in template names for architectures whose GGUFs often come without tokenizer.chat_template.
BUILTIN_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "qwen2": "chatml", "qwen3": "chatml"}


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render_jinja(source: str, messages: Sequence[Message], model: Model, add_generation_prompt: bool = True) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return _compile(source).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=model.bos_text,
            eos_token=model.eos_text,
        )
    except TemplateError as exc:
        raise InvalidOptionError(f"the chat template of {model.path} failed on these messages: {exc}") from exc


def render_builtin(name: str, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """llama.cpp's own rendering of a named built-in template."""
    chat = (lc.llama_chat_message * len(messages))()
    keep = []  # the encoded strings must outlive the call
    for slot, message in zip(chat, messages, strict=True):
        role, content = message["role"].encode("utf-8"), message["content"].encode("utf-8")
        keep += [role, content]
        slot.role, slot.content = role, content
    size = 1024 + 2 * sum(len(text) for text in keep)
    buf = ctypes.create_string_buffer(size)
    n = lc.llama_chat_apply_template(name.encode(), chat, len(messages), add_generation_prompt, buf, size)
    if n > size:
        buf = ctypes.create_string_buffer(n)
        n = lc.llama_chat_apply_template(name.encode(), chat, len(messages), add_generation_prompt, buf, n)
    if n < 0:
        raise InvalidOptionError(f"llama.cpp has no built-in chat template {name!r}")
    return buf.raw[:n].decode("utf-8")


def render_plain(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


@functools.cache
def _notice(path: str) -> None:
    warnings.warn(f"{path} has no chat template; using a plain User/Assistant transcript", stacklevel=4)


def render_chat(
    model: Model, messages: Sequence[Message], template: str | None = None, add_generation_prompt: bool = True
) -> tuple[str, bool]:
    """The prompt text for ``messages`` and whether tokenizing it should add the BOS token itself (a Jinja
    template writes its own, like transformers' apply_chat_template; llama.cpp's built-ins do not)."""
    for message in messages:
        if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
            raise InvalidOptionError(f"a chat message needs 'role' and 'content', got {message!r}")
    source = template
    if source is None:
        raw = lc.llama_model_chat_template(model.ptr, None)
        source = raw.decode("utf-8") if raw else None
    if source:
        return render_jinja(source, messages, model, add_generation_prompt), False
    builtin = BUILTIN_TEMPLATES.get(model.meta("general.architecture") or "")
    if builtin:
        return render_builtin(builtin, messages, add_generation_prompt), True
    _notice(str(model.path))
    return render_plain(messages, add_generation_prompt), True
