"""A real `genarm-local serve` process on a free loopback port, and plain-HTTP helpers for what the openai client
does not show (status codes, raw bodies, SSE lines). A module of its own, not conftest.py: `from conftest import`
picks whichever conftest was imported first."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import cli


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def client(self, key: str = "none"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        """(status, headers, parsed JSON or text) of one HTTP request."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json", **(headers or {})}
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, reply_headers, text = response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as error:
            status, reply_headers, text = error.code, dict(error.headers), error.read().decode()
        try:
            return status, reply_headers, json.loads(text)
        except json.JSONDecodeError:
            return status, reply_headers, text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(*args, cwd: Path, timeout: float = 240):
    """`genarm-local serve ARGS` on a free port, ready (GET /health is 200); interrupted and awaited afterwards."""
    port = free_port()
    log = cwd / f"serve-{port}.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(cli("serve", "--port", port, *args), cwd=cwd, stdout=sink, stderr=sink)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
            try:
                if server.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not become ready in {timeout} s:\n{log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        process.send_signal(2)  # SIGINT: uvicorn's graceful shutdown
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
