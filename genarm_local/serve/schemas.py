"""Request and response bodies of the HTTP API (pydantic), in OpenAI's shapes with llama-server's extras.

Requests declare only the fields that need translating; any other body field named like a SamplingConfig option
(top_k, min_p, repeat_penalty, grammar, normalized, ...) is passed through as that option, so a new sampling option
needs no change here. Fields that clients send by habit but we cannot honour (tools, n > 1, ...) are refused when
set; OpenAI fields that change nothing here (user, service_tier, store, metadata, parallel_tool_calls, ...) are accepted
and ignored, as llama-server does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.config import SamplingConfig
from ..core.errors import InvalidOptionError
from ..core.requests import check_option_types
from .errors import InvalidParamError

SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingConfig)}
# OpenAI fields whose meaning we do not implement: refused with a 400 when given a non-default value.
UNSUPPORTED = {"tools", "functions", "tool_choice", "echo", "suffix", "best_of", "audio", "modalities"}


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama-server's shorthand


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(default=False, description="a last chunk with no choices carries the usage")


class _Generation(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    n: int | None = None  # OpenAI's default 1; null means it too
    response_format: ResponseFormat | None = None
    arms: dict[str, float | None] | None = Field(
        default=None,
        description="per-request ARM weights {name: α}, over the chosen model's (preset's) weights; a negative α "
        "steers away from what the ARM prefers",
    )
    user: str | None = None
    timings_per_token: bool = Field(default=False, description="llama-server's: timings so far in every chunk")
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(
        default=None, description="OpenAI's: token id (as a string) → bias in [-100, 100] added to its logit"
    )

    def sampling_options(self) -> dict[str, Any]:
        """The SamplingConfig options this body sets (None means unset), type-checked; refuses what we cannot do."""
        extra = self.model_extra or {}
        for name in sorted(UNSUPPORTED & set(extra)):
            if extra[name] not in (None, False, {}, []) and not (name == "best_of" and extra[name] == 1):
                raise InvalidOptionError(f'"{name}" is not supported by this server')
        if self.n not in (None, 1):
            raise InvalidParamError("n", f'"n" must be 1: this server returns one choice per request, got {self.n}')
        fields = {name: getattr(self, name) for name in SAMPLING_FIELDS if name in type(self).model_fields}
        fields["logit_bias"] = self.token_biases()
        options = {name: value for name, value in {**fields, **extra}.items() if name in SAMPLING_FIELDS}
        options = {name: value for name, value in options.items() if value is not None}
        options.pop("logprobs", None)  # each endpoint has its own logprobs fields
        check_option_types(options)
        return options

    def token_biases(self) -> dict[int, float] | None:
        """logit_bias as OpenAI sends it ({"15043": -100}) → {token id: bias}; ids are checked against the
        vocabulary later, by the handler that knows the model."""
        if not self.logit_bias:
            return None
        biases = {}
        for key, bias in self.logit_bias.items():
            if not key.strip().isdecimal():
                raise InvalidParamError("logit_bias", f"logit_bias: {key!r} is not a token id (a whole number)")
            if not -100.0 <= bias <= 100.0:
                raise InvalidParamError(
                    "logit_bias", f"logit_bias: the bias of token {key} is {bias}, not in [-100, 100]"
                )
            biases[int(key)] = bias
        return biases


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; OpenAI's list of content parts is accepted when every part is text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        if not all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in self.content):
            raise InvalidOptionError("only text content parts are supported in messages")
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def sampling_options(self) -> dict[str, Any]:
        options = super().sampling_options()
        if self.max_completion_tokens is not None:
            options["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            options["logprobs"] = self.top_logprobs or 0
        elif self.top_logprobs:
            raise InvalidOptionError('"top_logprobs" needs "logprobs": true')
        return options


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)

    def sampling_options(self) -> dict[str, Any]:
        options = super().sampling_options()
        if self.logprobs is not None:
            options["logprobs"] = self.logprobs
        return options

    def prompt_input(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise InvalidOptionError('"prompt" as a list of strings must hold exactly one string (n = 1)')
            return self.prompt[0]
        return self.prompt


class PreferenceRequest(BaseModel):
    """A choice between two replies to the same conversation (the web chat's A/B buttons)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation up to the turn both replies answer")
    chosen: str = Field(description="the better reply, as generated")
    rejected: str = Field(description="the other reply")


class ArmLoadRequest(BaseModel):
    """An ARM to load into the running model."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1,
        description="a GGUF file on the server's machine (a LoRA adapter of the base, or a full model with its "
        "vocabulary), or a shipped ARM's name",
    )
    name: str | None = Field(default=None, pattern=r"^[\w.-]+$", max_length=64, description="default: the file's stem")
    alpha: float | None = Field(default=None, description="its weight in the default model; null: its recommended α")


class TokenizeRequest(BaseModel):
    content: str
    add_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    tokens: list[int]


# ---- responses ------------------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class Timings(BaseModel):
    """llama-server's timings object."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_second: float


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class _Response(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage | None = None
    timings: Timings | None = None
    arms: dict[str, float] | None = Field(default=None, description="the ARM weights the reply was generated with")


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "genarm-local"
    arms: dict[str, float] = Field(description="the ARM weights this model name stands for")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
