"""The FastAPI application (``create_app``) and ``serve``, which runs it with uvicorn.

Layers of one request, outside in: CORS (only with --cors-origin) → the API key check (every path but /health and
the static web page) → the body size limit → the body read as JSON whatever its Content-Type → FastAPI's routing and
pydantic validation → a handler (routes.py) → the model's decode loop (worker.py). The model loads on a thread of its
own after the server is listening; until then /health answers 503.
"""

from __future__ import annotations

import hmac
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.config import LoadConfig
from ..core.errors import InvalidOptionError
from . import errors
from .config import ServeConfig
from .ollama import router as ollama_router
from .routes import router
from .state import ServerState

STATIC = Path(__file__).resolve().parent / "static"
PUBLIC = {"/health", "/", "/favicon.ico"}  # the page itself holds no data; the API calls it makes need the key


class RequireKey:
    """401 for any path but the public ones unless 'Authorization: Bearer KEY' matches (compared in constant time)."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC or scope["path"].startswith("/static/"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            await self.app(scope, receive, send)
            return
        response = errors.error_response(401, "missing or wrong API key", "invalid_request_error", "invalid_api_key")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


class LimitBody:
    """413 for a request body over ``limit`` bytes, whether announced by Content-Length or streamed (chunked)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is over {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            too_large = errors.error_response(413, message, "invalid_request_error", "request_too_large")
            await too_large(scope, receive, send)
            return
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message_in = await receive()
            if message_in["type"] == "http.request":
                seen += len(message_in.get("body", b""))
                if seen > self.limit:  # while the body is read: errors.py turns it into the 413 body
                    raise HTTPException(413, message)
            return message_in

        await self.app(scope, counted_receive, send)


class JsonBody:
    """Read a request body as JSON whatever its Content-Type says, as llama-server does (`curl -d` sends
    application/x-www-form-urlencoded, many scripts send none), unless a browser page from another origin sent it:
    such "simple" requests skip the CORS preflight, so a page elsewhere must say application/json (which needs one)."""

    def __init__(self, app: ASGIApp, origins: tuple[str, ...]):
        self.app, self.origins = app, {origin.encode() for origin in origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            if b"json" not in headers.get(b"content-type", b"").lower():
                origin = headers.get(b"origin")
                ours = origin is None or origin in self.origins or origin.partition(b"://")[2] == headers.get(b"host")
                kind = b"application/json" if ours else b"text/plain"  # FastAPI reads a body without a type as JSON
                kept = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
                scope = dict(scope, headers=[*kept, (b"content-type", kind)])
        await self.app(scope, receive, send)


def create_app(settings: ServeConfig, load: LoadConfig, sampling: dict | None = None) -> FastAPI:
    """The server for ``load`` (the model and its ARMs), with ``sampling`` as the default sampling options."""
    state = ServerState(settings, load, sampling)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        yield
        await run_in_threadpool(state.worker.stop)

    app = FastAPI(title="genarm-local", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    errors.install(app)
    app.include_router(router)
    app.include_router(ollama_router)  # the Ollama API (/api/...) on the same port
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD /: how Ollama's CLI checks a server
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    # Added last = outermost: CORS answers preflights before the key check, which runs before the body is read.
    app.add_middleware(JsonBody, origins=settings.cors_origin)
    app.add_middleware(LimitBody, limit=settings.max_body_bytes)
    if state.key is not None:
        app.add_middleware(RequireKey, key=state.key)
    if settings.cors_origin:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origin), allow_methods=["*"], allow_headers=["*"]
        )
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so that a taken port is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidOptionError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: ServeConfig, load: LoadConfig, sampling: dict | None = None) -> None:
    """Run the server until interrupted; a model that fails to load stops it and is raised here."""
    import uvicorn

    app = create_app(settings, load, sampling)
    state: ServerState = app.state.server
    sock = listening_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def stop_on_failure() -> None:
        server.should_exit = True

    def announce_ready() -> None:  # on the engine thread, once the model is loaded; none if it fails (the error is)
        models = ", ".join(state.models)
        print(
            f"genarm-local serve: listening on {url} (web chat at /); models: {models}; preferences chosen in the web "
            f"chat go to {state.prefs}",
            file=sys.stderr,
            flush=True,
        )

    state.worker.on_load_failure = stop_on_failure
    state.worker.on_ready = announce_ready
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        server.run(sockets=[sock])  # on uvloop where it is installed (uvicorn's loop="auto")
    finally:
        sock.close()
    if state.worker.error is not None:
        raise state.worker.error
