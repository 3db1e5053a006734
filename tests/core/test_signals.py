"""Ctrl-C reaches the main thread: every thread we start blocks SIGINT and SIGTERM. The kernel delivers a
process-wide signal to any thread that does not block it; one delivered to a worker left `chat` asleep at its prompt
(a blocking read) instead of leaving. Checked through Linux's per-thread signal masks in /proc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread masks are read from /proc")

SCRIPT = """
import os, queue, signal, threading, time, types
from genarm_local.core.chat_template import _worker
from genarm_local.core.engine import Engine

_worker()._reader.submit(lambda: None).result()         # the chat template reader
engine = Engine.__new__(Engine)                          # the ARM decode pool, started as Engine.each does
engine._pool, engine.concurrent, engine.arms = None, True, [None]
engine.each([None, None], lambda context: None)
engine._inbox, engine.scheduler = queue.SimpleQueue(), types.SimpleNamespace(busy=False)
threading.Thread(target=engine._run, name="genarm-engine", daemon=True).start()  # the decode loop, idle
time.sleep(0.5)
main = threading.get_native_id()
for task in sorted(os.listdir("/proc/self/task")):
    status = open(f"/proc/self/task/{task}/status").read()
    blocked = int(next(l for l in status.splitlines() if l.startswith("SigBlk:")).split()[1], 16)
    name = open(f"/proc/self/task/{task}/comm").read().strip()
    print(task, name, int(task) == main, bool(blocked & (1 << (signal.SIGINT - 1))))
"""


def test_only_the_main_thread_takes_ctrl_c(tmp_path):
    # as the CLI runs (genarm_local/cli sets it): numpy's OpenBLAS pool, whose threads do not block signals, off
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    threads = [line.split() for line in done.stdout.splitlines()]
    workers = [(name, blocked) for _, name, is_main, blocked in threads if is_main == "False"]
    assert len(workers) >= 3, threads  # the engine thread and both executors' threads at least
    assert all(blocked == "True" for _, blocked in workers), threads
    assert [blocked for _, _, is_main, blocked in threads if is_main == "True"] == ["False"]
