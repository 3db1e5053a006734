"""Errors as OpenAI error bodies ({"error": {"message", "type", "param", "code"}}), the status chosen by the
exception's class (core/errors.py), never by its message."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..core.errors import (
    ContextOverflowError,
    CorruptModelError,
    GenArmError,
    InvalidOptionError,
    NumericalError,
    OutputWriteError,
    ServerBusyError,
    UnknownModelError,
)

log = logging.getLogger("genarm_local.serve")


class InvalidParamError(InvalidOptionError):
    """A request field with a value the server cannot take; the error body names it in "param", as OpenAI's do."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# The first class in an exception's MRO found here gives (status, OpenAI type, code).
STATUS: dict[type, tuple[int, str, str | None]] = {
    UnknownModelError: (404, "invalid_request_error", "model_not_found"),
    ContextOverflowError: (400, "invalid_request_error", "context_length_exceeded"),
    ServerBusyError: (503, "unavailable_error", "server_busy"),
    CorruptModelError: (500, "server_error", None),  # a decode failed: the server's problem, not the request's
    NumericalError: (500, "server_error", None),
    OutputWriteError: (500, "server_error", None),  # the server cannot write its preference file
    GenArmError: (400, "invalid_request_error", None),
}
HTTP_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_response(status: int, message: str, kind: str, code: str | None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_payload(message, kind, code, param), status_code=status)


def error_payload(message: str, kind: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_body(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for an exception raised while serving a request."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            status, kind, code = STATUS[cls]
            return status, error_payload(str(exc), kind, code, getattr(exc, "param", None))
    log.exception("unexpected error while serving a request", exc_info=exc)
    return 500, error_payload("internal server error (see the server's log)", "server_error", None)


def install(app: FastAPI) -> None:
    @app.exception_handler(GenArmError)
    async def genarm_error(request: Request, exc: GenArmError) -> JSONResponse:
        status, payload = error_body(exc)
        return JSONResponse(payload, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":  # its location is a character offset, not a parameter
            error = first.get("ctx", {}).get("error", first.get("msg"))
            at = f" at character {location[0]}" if location else ""
            message = f"the request body is malformed JSON (not valid JSON{at}: {error})"
            return error_response(400, message, "invalid_request_error", None)
        if not location and "json" not in request.headers.get("content-type", ""):
            message = "send the request body as JSON with 'Content-Type: application/json'"
        else:
            where = ".".join(location) or "body"
            message = f"{where}: {first.get('msg', 'invalid value').removeprefix('Value error, ')}"
        return error_response(400, message, "invalid_request_error", None, ".".join(location) or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        response = error_response(exc.status_code, str(exc.detail), kind, HTTP_CODES.get(exc.status_code))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        status, payload = error_body(exc)
        return JSONResponse(payload, status_code=status)
