"""The HTTP handlers. Each one only validates (core.requests.prepare, in a worker thread so the event loop stays free),
submits a task to the engine thread and reads that task's own result queue; none touches a llama.cpp context.

A client that disconnects cancels its sequence: a stream's generator is closed by Starlette (or fails on its next
send), a plain request's disconnect is watched while it waits; either way the scheduler drops the row at its next
step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..core.config import SamplingConfig
from ..core.errors import CorruptModelError, InvalidOptionError
from ..core.preferences import append_preference, preference_row
from ..core.requests import prepare
from ..core.sampling import json_grammar
from . import schemas
from .errors import InvalidParamError, error_body, error_response
from .formats import ChatFormat, CompletionFormat, timings
from .state import ServerState, model_id
from .worker import Failed, Finished, Piece, Task

router = APIRouter()


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def request_options(state: ServerState, body: schemas._Generation) -> dict:
    """The server's default sampling, overridden by the body's; response_format becomes a GBNF grammar (json_object:
    any JSON object; json_schema: that schema)."""
    given = body.sampling_options()
    biases, n_vocab = given.get("logit_bias") or {}, state.model.engine.n_vocab
    if any(token >= n_vocab for token in biases):
        raise InvalidParamError(
            "logit_bias", f"logit_bias: token id {max(biases)} is not in the vocabulary [0, {n_vocab})"
        )
    options = {**state.sampling, **given}
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return options
    if "grammar" in given:
        raise InvalidOptionError('give "grammar" or "response_format", not both')
    schema = response_format.schema_
    if response_format.type == "json_schema":
        given = response_format.json_schema
        schema = given.schema_ if given is not None and given.schema_ is not None else schema
        if schema is None:
            raise InvalidOptionError('response_format "json_schema" needs {"json_schema": {"schema": {...}}}')
    return dict(options, grammar=json_grammar(schema))


async def wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def coalesce(mail: list[Piece | Finished | Failed]) -> list[Piece | Finished | Failed]:
    """Events read together, consecutive pieces joined into one (one chunk for the tokens a busy loop fell behind
    on, not one per token)."""
    out: list[Piece | Finished | Failed] = []
    for event in mail:
        if isinstance(event, Piece) and out and isinstance(out[-1], Piece):
            out[-1].extend(event)
        else:
            out.append(event)
    return out


async def events(task: Task, request: Request) -> AsyncIterator[Piece | Finished]:
    """The task's events until it finishes, the pieces that arrived together as one; a failure is raised; a client
    disconnect ends them and cancels the task."""
    gone = asyncio.ensure_future(wait_disconnect(request))
    gone.add_done_callback(lambda _: task.mailbox.interrupt())
    finished = False
    try:
        while not gone.done():
            for event in coalesce(await task.mailbox.receive()):
                if isinstance(event, Failed):
                    finished = True
                    raise event.error
                finished = isinstance(event, Finished)
                yield event
                if finished:
                    return
    finally:
        gone.cancel()
        if not finished:
            task.cancel()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def respond(
    request: Request, state: ServerState, prepared, body: schemas._Generation, form: ChatFormat | CompletionFormat
):
    """Submit the request and answer it: one JSON body, or a stream (with llama-server's timings in every chunk
    when the body asks for "timings_per_token"; with OpenAI's "usage": null in every chunk and a last one with the
    usage when stream_options.include_usage asks for it)."""
    stream, per_token = body.stream, body.timings_per_token
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    task = state.worker.submit(prepared, asyncio.get_running_loop())
    stream_events = events(task, request)
    if not stream:
        pieces: list[Piece] = []
        async for event in stream_events:
            if isinstance(event, Finished):
                return JSONResponse(form.whole(pieces, event).model_dump(exclude_none=True))
            pieces.append(event)
        return Response(status_code=499)  # the client is gone; nobody reads this

    # The first event before the headers: an error at admission is still a proper status code.
    try:
        first = await anext(stream_events)
    except StopAsyncIteration:
        return Response(status_code=499)  # the client left while its request waited for a slot
    except BaseException:
        await stream_events.aclose()
        raise

    def chunk(response) -> str:
        data = response.model_dump(exclude_none=True)
        return sse({**data, "usage": None} if include_usage else data)

    def render(event: Piece | Finished) -> list[str]:
        if isinstance(event, Finished):
            usage = [sse(form.usage_chunk(event))] if include_usage else []
            return [chunk(form.last_chunk(event)), *usage, sse("[DONE]")]
        return [chunk(form.chunk(event, timings(task.job) if per_token else None))]

    async def body() -> AsyncIterator[str]:
        finished = isinstance(first, Finished)
        try:
            for line in render(first):
                yield line
            async for event in stream_events:
                finished = isinstance(event, Finished)
                for line in render(event):
                    yield line
        except Exception as exc:  # after the headers: the error goes in the stream, as llama-server does
            finished = True
            yield sse(error_body(exc)[1])
        finally:
            if not finished:
                task.cancel()  # now: the awaits below may not run in a cancelled task
            await stream_events.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


@router.post("/v1/chat/completions")
async def chat_completions(body: schemas.ChatCompletionRequest, request: Request):
    state = state_of(request)
    model = state.served_model(body.model)
    weights = state.weights(model, body.arms)
    options = request_options(state, body)
    messages = [{"role": message.role, "content": message.text()} for message in body.messages]
    prepared = await run_in_threadpool(prepare, state.model, messages=messages, weights=weights, options=options)
    form = ChatFormat(state, model)
    return await respond(request, state, prepared, body, form)


@router.post("/v1/completions")
async def completions(body: schemas.CompletionRequest, request: Request):
    state = state_of(request)
    model = state.served_model(body.model)
    weights = state.weights(model, body.arms)
    options = request_options(state, body)
    prompt = body.prompt_input()
    prepared = await run_in_threadpool(prepare, state.model, prompt=prompt, weights=weights, options=options)
    form = CompletionFormat(state, model)
    return await respond(request, state, prepared, body, form)


@router.get("/v1/models")
async def models(request: Request) -> schemas.ModelList:
    state = state_of(request)
    cards = [schemas.ModelCard(id=name, created=state.created, arms=arms) for name, arms in state.models.items()]
    return schemas.ModelList(data=cards)


@router.post("/v1/preferences")
async def preferences(body: schemas.PreferenceRequest, request: Request) -> dict:
    """Append the choice to the server's preference file (serve --prefs) as a TRL preference pair."""
    state = state_of(request)
    messages = [{"role": message.role, "content": message.text()} for message in body.messages]
    row = preference_row(messages, body.chosen, body.rejected)
    path = await run_in_threadpool(append_preference, state.prefs, row)
    return {"object": "preference", "path": str(path)}


@router.post("/v1/arms")
async def load_arm(body: schemas.ArmLoadRequest, request: Request):
    """Load an ARM into the running model; /v1/models lists it at once, and requests may weight it."""
    state = state_of(request)
    try:
        spec = await run_in_threadpool(state.load_arm, body.path, body.alpha, body.name)
    except CorruptModelError as exc:  # llama.cpp could not load the file: the request's fault, not a failed decode
        return error_response(400, str(exc), "invalid_request_error", "invalid_arm")
    alpha = state.model.arm_weights()[spec.name]
    model = f"{model_id(state.model)}+{spec.name}"
    return {"object": "arm", "name": spec.name, "path": str(spec.path), "alpha": alpha, "model": model}


@router.get("/props")
async def props(request: Request) -> dict:
    """llama-server's /props (default_generation_settings, total_slots, model_path, chat_template, endpoint_*), and
    what the web page needs: the loaded ARMs and their weights, the model names, the server's own sampling options."""
    state = state_of(request)
    model = state.model
    sampling = {k: list(v) if isinstance(v, tuple) else v for k, v in state.sampling.items() if k != "grammar"}
    defaults = dataclasses.asdict(SamplingConfig.from_options(state.sampling))
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    template = model.chat_template
    return {
        "default_generation_settings": {"n_ctx": model.engine.n_ctx, "params": params},
        "total_slots": state.worker.parallel,
        "model_path": str(model.engine.base_model.path),
        "chat_template": template.source or template.name,
        "endpoint_slots": True,
        "endpoint_metrics": state.settings.metrics,
        "default_model": state.default_model,
        "models": list(state.models),
        "arms": model.arm_weights(),
        "parallel": state.worker.parallel,
        "n_ctx": model.engine.n_ctx,
        "sampling": sampling,
    }


@router.get("/health")
async def health(request: Request):
    worker = state_of(request).worker
    if worker.model is not None:
        return {"status": "ok", "slots": worker.parallel, "in_flight": worker.in_flight}
    status = "loading model" if worker.error is None else f"failed to load the model: {worker.error}"
    return JSONResponse({"status": status}, status_code=503)


@router.get("/slots")
async def slots(request: Request, fail_on_no_slot: bool = False):
    """llama-server's /slots: each slot's id and whether a request runs in it (with its prompt's length and the
    tokens generated so far); ?fail_on_no_slot=1 answers 503 when every slot is busy."""
    state = state_of(request)
    n_ctx = state.model.engine.n_ctx
    running = {task.job.slot: task for task in state.worker.tasks() if task.job.slot is not None}
    out = []
    for slot in range(state.worker.parallel):
        task = running.get(slot)
        entry = {"id": slot, "n_ctx": n_ctx, "is_processing": task is not None, "state": int(task is not None)}
        if task is not None:
            entry.update(n_prompt_tokens=len(task.job.tokens), next_token={"n_decoded": task.completion_tokens})
        out.append(entry)
    if fail_on_no_slot and len(running) >= state.worker.parallel:
        return error_response(503, "no slot available", "unavailable_error", "no_slot_available")
    return out


# llama-server's metric names, so that its dashboards and scrape configs read these; requests_total is ours.
METRICS = (
    ("llamacpp:prompt_tokens_total", "counter", "Number of prompt tokens processed."),
    ("llamacpp:prompt_seconds_total", "counter", "Prompt process time."),
    ("llamacpp:tokens_predicted_total", "counter", "Number of generation tokens processed."),
    ("llamacpp:tokens_predicted_seconds_total", "counter", "Predict process time."),
    ("genarm_local:requests_total", "counter", "Number of generation requests that ended."),
    ("llamacpp:prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s."),
    ("llamacpp:predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s."),
    ("llamacpp:requests_processing", "gauge", "Number of requests processing."),
    ("llamacpp:requests_deferred", "gauge", "Number of requests deferred (waiting for a slot)."),
)


@router.get("/metrics")
async def metrics(request: Request):
    """Prometheus text format, only with serve --metrics (llama-server answers 501 without its flag, too)."""
    state = state_of(request)
    if not state.settings.metrics:
        message = "this server does not serve /metrics; start it with --metrics"
        return error_response(501, message, "not_supported_error", None)
    counters, tasks = state.worker.counters, state.worker.tasks()
    processing = sum(task.job.slot is not None for task in tasks)
    values = (
        counters.prompt_tokens,
        counters.prompt_seconds,
        counters.generated_tokens,
        counters.generation_seconds,
        counters.requests,
        counters.prompt_tokens / counters.prompt_seconds if counters.prompt_seconds else 0.0,
        counters.generated_tokens / counters.generation_seconds if counters.generation_seconds else 0.0,
        processing,
        len(tasks) - processing,
    )
    lines = []
    for (name, kind, help_text), value in zip(METRICS, values, strict=True):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


@router.post("/tokenize")
async def tokenize(body: schemas.TokenizeRequest, request: Request) -> dict:
    base = state_of(request).model.engine.base_model
    tokens = base.tokenize(body.content, add_special=body.add_special)
    if body.with_pieces:
        return {"tokens": [{"id": t, "piece": base.token_bytes(t).decode("utf-8", errors="replace")} for t in tokens]}
    return {"tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: schemas.DetokenizeRequest, request: Request) -> dict:
    model = state_of(request).model
    n_vocab = model.engine.n_vocab
    if any(not 0 <= token < n_vocab for token in body.tokens):
        raise InvalidOptionError(f"token ids must be in [0, {n_vocab})")
    return {"content": model.detokenize(body.tokens)}
