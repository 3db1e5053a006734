"""The engine thread's events (worker.Piece / Finished) in OpenAI's response shapes, for chat and for completions:
a whole response, or one chunk of a stream."""

from __future__ import annotations

import time
import uuid

from ..core.scheduler import Job
from . import schemas
from .state import ServerState
from .worker import Finished, Piece


def token_logprobs(state: ServerState, pieces: list[Piece]) -> list[dict]:
    """Each generated token of ``pieces`` with its log-prob and top alternatives, in the shape OpenAI's chat
    logprobs and Ollama's share: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""
    entries = []
    for piece in pieces:
        for token, logprob, top in zip(piece.tokens, piece.logprobs, piece.top_logprobs, strict=True):
            text, raw = state.token_text(token)
            alternatives = []
            for other, other_logprob in top.items():
                other_text, other_raw = state.token_text(other)
                alternatives.append({"token": other_text, "logprob": other_logprob, "bytes": other_raw})
            entries.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alternatives})
    return entries


def usage(done: Finished) -> schemas.Usage:
    prompt = len(done.job.tokens)
    return schemas.Usage(
        prompt_tokens=prompt,
        completion_tokens=done.completion_tokens,
        total_tokens=prompt + done.completion_tokens,
        prompt_tokens_details=schemas.PromptTokensDetails(cached_tokens=done.job.cached_tokens),
    )


def ending(state: ServerState, done: Finished) -> dict:
    """What the finish chunk (or the whole response) adds: timings and the ARM weights actually used."""
    names = [arm.name for arm in state.model.arms]  # an ARM loaded while the job ran: 0 for it (Engine.add_arm)
    arms = dict.fromkeys(names, 0.0) | dict(zip(names, done.job.alphas, strict=False))
    return {"timings": timings(done.job), "arms": arms}


def timings(job: Job) -> schemas.Timings:
    """llama-server's timings of ``job``: final once it finished, so far while it runs (timings_per_token)."""
    t = job.timings
    return schemas.Timings(
        cache_n=job.cached_tokens,
        prompt_n=t.prompt_decoded,
        prompt_ms=round(t.prompt_s * 1000, 3),
        prompt_per_second=round(t.prompt_tokens_per_s, 2),
        predicted_n=t.generated_tokens,
        predicted_ms=round(t.generation_s * 1000, 3),
        predicted_per_second=round(t.generated_tokens_per_s, 2),
    )


class _Format:
    chunk_object: str

    def _head(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}

    def usage_chunk(self, done: Finished) -> dict:
        """OpenAI's stream_options.include_usage: one more chunk after the finish chunk, no choices, the usage."""
        return {**self._head(), "object": self.chunk_object, "choices": [], "usage": usage(done).model_dump()}


class ChatFormat(_Format):
    """/v1/chat/completions: message / delta, logprobs as content entries."""

    chunk_object = "chat.completion.chunk"

    def __init__(self, state: ServerState, model: str):
        self.state, self.model = state, model
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self._first = True

    def logprobs(self, pieces: list[Piece]) -> schemas.ChatLogprobs | None:
        if not pieces or pieces[0].logprobs is None:
            return None
        return schemas.ChatLogprobs.model_validate({"content": token_logprobs(self.state, pieces)})

    def chunk(self, piece: Piece, so_far: schemas.Timings | None = None) -> schemas.ChatCompletionChunk:
        delta = schemas.Delta(role="assistant" if self._first else None, content=piece.text)
        self._first = False
        choice = schemas.ChatChunkChoice(delta=delta, logprobs=self.logprobs([piece]))
        return schemas.ChatCompletionChunk(**self._head(), choices=[choice], timings=so_far)

    def last_chunk(self, done: Finished) -> schemas.ChatCompletionChunk:
        choice = schemas.ChatChunkChoice(delta=schemas.Delta(), finish_reason=done.reason)
        return schemas.ChatCompletionChunk(**self._head(), choices=[choice], **ending(self.state, done))

    def whole(self, pieces: list[Piece], done: Finished) -> schemas.ChatCompletion:
        message = schemas.AssistantMessage(content="".join(piece.text for piece in pieces))
        choice = schemas.ChatChoice(message=message, logprobs=self.logprobs(pieces), finish_reason=done.reason)
        return schemas.ChatCompletion(**self._head(), choices=[choice], usage=usage(done), **ending(self.state, done))


class CompletionFormat(_Format):
    """/v1/completions: text, and the legacy logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""

    chunk_object = "text_completion"

    def __init__(self, state: ServerState, model: str):
        self.state, self.model = state, model
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self._offset = 0

    def logprobs(self, pieces: list[Piece]) -> schemas.CompletionLogprobs | None:
        if not pieces or pieces[0].logprobs is None:
            return None
        out = schemas.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for piece in pieces:
            for token, logprob, top in zip(piece.tokens, piece.logprobs, piece.top_logprobs, strict=True):
                text, _ = self.state.token_text(token)
                out.tokens.append(text)
                out.token_logprobs.append(logprob)
                out.top_logprobs.append({self.state.token_text(t)[0]: lp for t, lp in top.items()})
                out.text_offset.append(self._offset)
                self._offset += len(text)
        return out

    def chunk(self, piece: Piece, so_far: schemas.Timings | None = None) -> schemas.Completion:
        choice = schemas.CompletionChoice(text=piece.text, logprobs=self.logprobs([piece]))
        return schemas.Completion(**self._head(), choices=[choice], timings=so_far)

    def last_chunk(self, done: Finished) -> schemas.Completion:
        choice = schemas.CompletionChoice(text="", finish_reason=done.reason)
        return schemas.Completion(**self._head(), choices=[choice], **ending(self.state, done))

    def whole(self, pieces: list[Piece], done: Finished) -> schemas.Completion:
        text = "".join(piece.text for piece in pieces)
        choice = schemas.CompletionChoice(text=text, logprobs=self.logprobs(pieces), finish_reason=done.reason)
        return schemas.Completion(**self._head(), choices=[choice], usage=usage(done), **ending(self.state, done))
