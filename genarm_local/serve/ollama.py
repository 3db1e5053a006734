"""The Ollama API on the server's own port: /api/chat and /api/generate (NDJSON streams by default), /api/tags,
/api/show, /api/ps and /api/version, for apps that speak only Ollama's protocol.

The handlers are the OpenAI ones' twins in another dialect: they validate (core.requests.prepare), submit a task to
the same engine worker and read its mailbox (routes.events); there is no second decode path. What differs is naming
and shapes:

- Models are named ``repository:tag`` after the /v1/models names: the base alone is ``<base>:latest`` (a name
  without a tag means ``:latest``), each ARM and the all-ARMs name are tags of the base (``<base>:positive``,
  ``<base>:positive+concise``), and each --preset is a tag of its own (``<base>:gentle``). The /v1/models names are
  accepted as they are too. An unknown name is a 404, as Ollama answers a model it has not pulled.
- ``options`` holds llama.cpp's sampling names (num_predict, temperature, top_k, top_p, min_p, seed, stop,
  repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, and any other SamplingConfig option);
  ``num_ctx`` caps the request's window below the server's -c; options Ollama has and we do not (num_thread,
  num_gpu, mirostat, ...) are ignored, as Ollama ignores options it does not know. ARM weights ride in ``arms``,
  either at the top level (as in the OpenAI routes) or inside ``options`` (where the official client can put them).
- Errors are ``{"error": "message"}`` with the status of the exception's class (errors.STATUS), a 400 for a body
  that does not validate; after a stream began, the error is its last line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

import gguf
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..core import __version__
from ..core.config import SamplingConfig
from ..core.errors import ContextOverflowError, InvalidOptionError, UnknownModelError
from ..core.native import supports_gpu_offload
from ..core.requests import Prepared, check_option_types, prepare
from ..core.sampling import json_grammar
from .errors import error_body
from .formats import token_logprobs
from .routes import events, state_of
from .state import ServerState, model_id
from .worker import Finished, Piece

# options named as Ollama names them where SamplingConfig has another name; logprobs are top-level fields
RENAMED = {"num_predict": "max_tokens"}
SAMPLING = {f.name for f in dataclasses.fields(SamplingConfig)} - {"logprobs", "max_tokens"}
NEVER = "9999-12-31T23:59:59Z"  # expires_at of a model that stays loaded as long as the server runs


class OllamaRoute(APIRoute):
    """A route whose every error, a body that does not validate included, is Ollama's {"error": "message"}."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                status, message = error_message(exc)
                return JSONResponse({"error": message}, status_code=status)

        return handle


def error_message(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, message) of an exception, the status chosen by its class as for the OpenAI routes."""
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return 400, f"invalid JSON in the request body: {first.get('ctx', {}).get('error', first.get('msg'))}"
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
        return 400, f"{where}: {first.get('msg', 'invalid value')}"
    if isinstance(exc, HTTPException):
        return exc.status_code, str(exc.detail)
    status, payload = error_body(exc)
    return status, payload["error"]["message"]


router = APIRouter(route_class=OllamaRoute)


# ---- requests -------------------------------------------------------------------------------------------------------


class _Generation(BaseModel):
    """Fields shared by /api/generate and /api/chat; fields Ollama has that change nothing here are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None  # the model stays loaded as long as the server runs
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    arms: dict[str, float | None] | None = Field(
        default=None, description="per-request ARM weights {name: α}, over the model name's weights"
    )

    def sampling_options(self, state: ServerState) -> dict[str, Any]:
        """The server's default sampling, overridden by ``options`` (num_predict -1: until the end of generation)
        and ``format`` (a GBNF grammar); unknown options ignored, as Ollama does."""
        given: dict[str, Any] = {}
        for name, value in (self.options or {}).items():
            name = RENAMED.get(name, name)
            if name in SAMPLING or name == "max_tokens":
                given[name] = value
        if isinstance(given.get("max_tokens"), int) and given["max_tokens"] < 0:
            given["max_tokens"] = None  # Ollama's -1 (until done) and -2 (fill the context)
        given = {name: value for name, value in given.items() if value is not None or name == "max_tokens"}
        check_option_types(given)
        options = {"max_tokens": None, **state.sampling, **given}
        if self.logprobs:
            options["logprobs"] = self.top_logprobs or 0
        if self.format in (None, ""):
            return options
        if "grammar" in given:
            raise InvalidOptionError('give "format" or the "grammar" option, not both')
        if self.format == "json":
            return dict(options, grammar=json_grammar())
        if isinstance(self.format, dict):
            return dict(options, grammar=json_grammar(self.format))
        raise InvalidOptionError(f'invalid format {self.format!r}: expected "json" or a JSON schema')

    def weights(self) -> dict[str, float | None] | None:
        """The request's ARM weights: options.arms, overridden by the top-level arms."""
        in_options = (self.options or {}).get("arms")
        if in_options is not None and not isinstance(in_options, dict):
            raise InvalidOptionError("options.arms must be an object of ARM name → number")
        return {**(in_options or {}), **(self.arms or {})}

    def refuse_unsupported(self, model: str) -> None:
        if self.think not in (None, False, "", "false"):
            raise InvalidOptionError(f'"{model}" does not support thinking')


class GenerateRequest(_Generation):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None

    def refuse_unsupported(self, model: str) -> None:
        super().refuse_unsupported(model)
        if self.suffix:
            raise InvalidOptionError(f'"{model}" does not support insert')
        if self.images:
            raise InvalidOptionError(f'"{model}" does not support images')
        if self.template:
            raise InvalidOptionError('"template" is not supported: give "raw": true and the templated prompt')
        if self.context:
            raise InvalidOptionError('"context" is not supported: use /api/chat for a conversation')


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str = ""
    images: list[str] | None = None


class ChatRequest(_Generation):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None

    def refuse_unsupported(self, model: str) -> None:
        super().refuse_unsupported(model)
        if self.tools:
            raise InvalidOptionError(f'"{model}" does not support tools')
        if any(message.images for message in self.messages):
            raise InvalidOptionError(f'"{model}" does not support images')


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    name: str = ""  # the older spelling of "model"


# ---- model names ----------------------------------------------------------------------------------------------------


def ollama_names(state: ServerState) -> dict[str, str]:
    """Ollama name → the /v1/models name it stands for (see the module docstring)."""
    base = model_id(state.model)
    names = {}
    for name in state.models:
        if name == base:
            names[f"{base}:latest"] = name
        elif name.startswith(f"{base}+"):
            names[f"{base}:{name[len(base) + 1 :]}"] = name
        else:  # a preset
            names[name if ":" in name else f"{base}:{name}"] = name
    return names


def resolve(state: ServerState, name: str) -> tuple[str, str]:
    """(Ollama name, /v1/models name) of the model a request names; 400 without one, 404 for an unknown one."""
    if not name:
        raise InvalidOptionError("model is required")
    names = ollama_names(state)
    if name in state.models:  # a /v1/models name as it is
        return next((o for o, v1 in names.items() if v1 == name), name), name
    tagged = name if ":" in name else f"{name}:latest"
    if tagged not in names:
        raise UnknownModelError(f'model "{name}" not found, try pulling it first')
    return tagged, names[tagged]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def file_time(path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")


def details(state: ServerState) -> dict:
    """Ollama's "details" of the base: format, family, parameter size, quantization."""
    base = state.model.engine.base_model
    family = base.meta("general.architecture") or ""
    n_params = base.n_params
    size = f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.2f}M"
    file_type = base.meta("general.file_type")
    try:
        quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        quantization = "unknown"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": size,
        "quantization_level": quantization,
    }


def model_entry(state: ServerState, name: str, v1_name: str) -> dict:
    """One model as /api/tags lists it; its size is the files it runs (the base and the ARMs it weights)."""
    weights = state.weights(v1_name, None)
    base_path = state.model.engine.base_model.path
    files = [base_path, *(arm.path for arm in state.model.arms if weights.get(arm.name))]
    identity = json.dumps([name, str(base_path), weights], sort_keys=True)
    return {
        "name": name,
        "model": name,
        "modified_at": file_time(base_path),
        "size": sum(path.stat().st_size for path in files),
        "digest": hashlib.sha256(identity.encode()).hexdigest(),
        "details": details(state),
        "arms": weights,
    }


# ---- replies --------------------------------------------------------------------------------------------------------


class Reply:
    """Ollama's response objects for one request: its chunks, and the last one with done_reason and statistics."""

    def __init__(self, state: ServerState, model: str, chat: bool, started: int):
        self.state, self.model, self.chat, self.started = state, model, chat, started
        self.submitted = started

    def _text(self, text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}} if self.chat else {"response": text}

    def logprobs(self, pieces: list[Piece]) -> dict:
        """Ollama's "logprobs": one entry per token with its top alternatives, when the request asked for them."""
        if not pieces or pieces[0].logprobs is None:
            return {}
        return {"logprobs": token_logprobs(self.state, pieces)}

    def chunk(self, pieces: list[Piece], done: Finished | None = None) -> dict:
        text = "".join(piece.text for piece in pieces)
        out = {"model": self.model, "created_at": now(), **self._text(text), **self.logprobs(pieces), "done": False}
        if done is not None:
            out.update(done=True, done_reason=done.reason, **self.statistics(done))
        return out

    def statistics(self, done: Finished) -> dict:
        """Ollama's counts and durations (nanoseconds); load_duration is the time spent preparing the request,
        the model being always loaded."""
        timings = done.job.timings
        names = [arm.name for arm in self.state.model.arms]
        arms = dict.fromkeys(names, 0.0) | dict(zip(names, done.job.alphas, strict=False))
        return {
            "total_duration": time.perf_counter_ns() - self.started,
            "load_duration": self.submitted - self.started,
            "prompt_eval_count": len(done.job.tokens),
            "prompt_eval_duration": int(timings.prompt_s * 1e9),
            "eval_count": done.completion_tokens,
            "eval_duration": int(timings.generation_s * 1e9),
            "arms": arms,
        }

    def loaded(self) -> dict:
        """The answer to an empty prompt: Ollama's way to load a model, which is already loaded here."""
        return {"model": self.model, "created_at": now(), **self._text(""), "done": True, "done_reason": "load"}


def ndjson(line: dict) -> str:
    return json.dumps(line, ensure_ascii=False) + "\n"


def fit_context(state: ServerState, prepared: Prepared, body: _Generation) -> Prepared:
    """Ollama's num_ctx, where it is below the server's context: the prompt must fit it, and generation stops at it."""
    num_ctx = (body.options or {}).get("num_ctx")
    if not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or not 0 < num_ctx < state.model.engine.n_ctx:
        return prepared
    room = num_ctx - len(prepared.tokens)
    if room <= 0:
        raise ContextOverflowError(f"the prompt is {len(prepared.tokens)} tokens, num_ctx is {num_ctx}")
    limit = prepared.config.max_tokens
    config = dataclasses.replace(prepared.config, max_tokens=room if limit is None or limit > room else limit)
    return dataclasses.replace(prepared, config=config)


async def answer(request: Request, state: ServerState, prepared: Prepared, body: _Generation, reply: Reply):
    """Submit the request and answer it: NDJSON lines, the last with "done": true, or one object."""
    task = state.worker.submit(prepared, asyncio.get_running_loop())
    reply.submitted = time.perf_counter_ns()
    stream_events = events(task, request)
    if not body.stream:
        pieces: list[Piece] = []
        async for event in stream_events:
            if isinstance(event, Finished):
                return JSONResponse(reply.chunk(pieces, event))
            pieces.append(event)
        return Response(status_code=499)  # the client is gone; nobody reads this

    # The first event before the headers: an error at admission is still a proper status code.
    try:
        first = await anext(stream_events)
    except StopAsyncIteration:
        return Response(status_code=499)
    except BaseException:
        await stream_events.aclose()
        raise

    def render(event: Piece | Finished) -> str:
        return ndjson(reply.chunk([], event) if isinstance(event, Finished) else reply.chunk([event]))

    async def lines() -> AsyncIterator[str]:
        finished = isinstance(first, Finished)
        try:
            yield render(first)
            async for event in stream_events:
                finished = isinstance(event, Finished)
                yield render(event)
        except Exception as exc:  # after the headers: the error is the stream's last line, as Ollama does
            finished = True
            yield ndjson({"error": error_message(exc)[1]})
        finally:
            if not finished:
                task.cancel()
            await stream_events.aclose()

    return StreamingResponse(lines(), media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"})


# ---- routes ---------------------------------------------------------------------------------------------------------


async def respond(request: Request, body: GenerateRequest | ChatRequest, chat: bool, request_input: dict | None):
    """The two routes' one path: resolve the model, answer an empty request as Ollama's load answer, else prepare
    ``request_input`` (a prompt or messages) with the body's weights and options and answer it."""
    started = time.perf_counter_ns()
    state = state_of(request)
    name, v1_name = resolve(state, body.model)
    body.refuse_unsupported(name)
    reply = Reply(state, name, chat=chat, started=started)
    if request_input is None:
        return JSONResponse(reply.loaded())
    weights = state.weights(v1_name, body.weights())
    options = body.sampling_options(state)
    prepared = await run_in_threadpool(prepare, state.model, weights=weights, options=options, **request_input)
    return await answer(request, state, fit_context(state, prepared, body), body, reply)


@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request):
    if not body.prompt:
        request_input = None
    elif body.raw:
        request_input = {"prompt": body.prompt}
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []
        request_input = {"messages": [*system, {"role": "user", "content": body.prompt}]}
    return await respond(request, body, False, request_input)


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request):
    messages = [{"role": message.role, "content": message.content} for message in body.messages]
    return await respond(request, body, True, {"messages": messages} if messages else None)


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    state = state_of(request)
    return {"models": [model_entry(state, name, v1_name) for name, v1_name in ollama_names(state).items()]}


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    """Every name is served by the one loaded model, so all are loaded; in GPU memory as far as layers are offloaded."""
    state = state_of(request)
    on_gpu = state.worker.load.n_gpu_layers != 0 and supports_gpu_offload()
    n_ctx = state.model.engine.n_ctx
    models = []
    for name, v1_name in ollama_names(state).items():
        entry = model_entry(state, name, v1_name)
        del entry["modified_at"]
        size_vram = entry["size"] if on_gpu else 0
        models.append({**entry, "expires_at": NEVER, "size_vram": size_vram, "context_length": n_ctx})
    return {"models": models}


@router.post("/api/show")
async def show(body: ShowRequest, request: Request) -> dict:
    state = state_of(request)
    _, v1_name = resolve(state, body.model or body.name)
    model = state.model
    base = model.engine.base_model
    family = base.meta("general.architecture") or ""
    model_info = {
        "general.architecture": family,
        "general.name": base.meta("general.name"),
        "general.parameter_count": base.n_params,
        "general.file_type": base.meta("general.file_type"),
        f"{family}.context_length": base.meta(f"{family}.context_length"),
    }
    defaults = dataclasses.asdict(SamplingConfig.from_options({k: v for k, v in state.sampling.items()}))
    shown = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "stop")
    parameters = []
    for option in shown:
        values = defaults[option] if option == "stop" else [defaults[option]]
        parameters += [f"{option:<30} {json.dumps(value) if option == 'stop' else value}" for value in values]
    template = model.chat_template
    return {
        "modelfile": f"# served by genarm-local\nFROM {base.path}\n",
        "parameters": "\n".join(parameters),
        "template": template.source or template.name,
        "details": details(state),
        "model_info": {key: value for key, value in model_info.items() if value is not None},
        "capabilities": ["completion"],
        "modified_at": file_time(base.path),
        "arms": state.weights(v1_name, None),
    }


@router.get("/api/version")
async def version() -> dict:
    return {"version": __version__}


@router.api_route("/api/{path:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
async def not_served(path: str):
    """Ollama's model management (pull, push, create, copy, delete) and embeddings are not served: a 404 in Ollama's
    shape, which its clients show, rather than the OpenAI routes' error object."""
    served = "/api/chat, /api/generate, /api/tags, /api/show, /api/ps and /api/version"
    raise HTTPException(404, f"/api/{path} is not served by genarm-local (it serves {served})")
