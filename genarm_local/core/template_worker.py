"""The child process that renders untrusted Jinja chat templates (see chat_template.py for why).

Reads one JSON request per line on stdin ({"source", "context"}), answers one JSON line on stdout ({"text"} or
{"error"}). Defences, each against one kind of hostile template:
- Jinja's ImmutableSandboxedEnvironment: no access to private attributes (``__class__``, ``__subclasses__``, ...),
  no mutation of the messages, ``range`` capped (jinja2.sandbox.MAX_RANGE);
- an address-space limit on this process (RLIMIT_AS, where the OS supports it): a string or list grown until memory
  runs out ends in MemoryError here, not in the host;
- an output limit (MAX_OUTPUT characters), checked while rendering streams;
- the parent's time limit: a template still running after its budget has this process killed.
Imports nothing from genarm_local beyond this file, so it starts in a bare interpreter quickly.
"""

from __future__ import annotations

import json
import sys

MAX_OUTPUT = 4_000_000  # characters: far beyond any context window
MEMORY_LIMIT = 1 << 30  # bytes of address space


def _limit_memory() -> None:
    try:
        import resource
    except ImportError:  # Windows: the parent's time limit still applies
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = MEMORY_LIMIT if hard == resource.RLIM_INFINITY else min(MEMORY_LIMIT, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):  # e.g. macOS refuses RLIMIT_AS: the time limit still applies
        pass


def _environment():
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def strftime_now(format: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


def render(env, cache: dict, source: str, context: dict) -> dict:
    from jinja2.exceptions import SecurityError, TemplateError

    try:
        template = cache.get(source)
        if template is None:
            cache.clear()
            template = cache[source] = env.from_string(source)
        pieces, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > MAX_OUTPUT:
                return {"error": f"the output grew past {MAX_OUTPUT:,} characters"}
            pieces.append(piece)
        return {"text": "".join(pieces)}
    except SecurityError as exc:
        return {"error": f"it tried something the sandbox forbids ({exc})"}
    except MemoryError:
        return {"error": f"it needed more than {MEMORY_LIMIT >> 20} MiB of memory"}
    except RecursionError:
        return {"error": "it recursed too deeply"}
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    _limit_memory()
    env, cache = _environment(), {}
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            reply = render(env, cache, request["source"], request["context"])
        except MemoryError:
            reply = {"error": f"it needed more than {MEMORY_LIMIT >> 20} MiB of memory"}
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"error": f"bad request to the template renderer: {exc}"}
        try:
            text = json.dumps(reply)
        except MemoryError:
            text = json.dumps({"error": "its output did not fit in memory"})
        out.write(text + "\n")
        out.flush()


if __name__ == "__main__":
    main()
