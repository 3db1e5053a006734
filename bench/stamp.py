"""Where and when a measurement was taken, stored inside the JSON that holds it.

Every bench script that writes results calls ``measurement_stamp`` before measuring (so a dirty tree is refused
before any time is spent) and ``write_stamped`` at the end; bench/report.py renders each section with its own
stamp, so a section reused from an older run keeps the date, machine and commit it was measured on.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class DirtyTreeError(SystemExit):
    pass


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores, {platform.system()} {platform.release()}"


def commit(allow_dirty: bool) -> str:
    """HEAD's short id; a tree with tracked changes is refused unless ``allow_dirty``, which says "uncommitted".

    Results are not what is measured: changes under docs/ and to README.md (what the bench scripts and report.py
    write) do not count, so `report.py --measure a b` can run b after a has written its JSON."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs"]
    status.append(":(exclude)README.md")
    changes = subprocess.run(status, cwd=REPO, capture_output=True, text=True).stdout.strip()
    if not changes:
        return head.stdout.strip()
    if not allow_dirty:
        raise DirtyTreeError(
            "the work tree has uncommitted changes to tracked files: commit them before measuring, or pass "
            "--allow-dirty to stamp the results as uncommitted"
        )
    return f"{head.stdout.strip()} + uncommitted changes"


def measurement_stamp(allow_dirty: bool = False) -> dict:
    """Date, machine, commit, and the 1-minute load average when measuring started (timings taken on a busy
    machine are not comparable with a quiet one's)."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "commit": commit(allow_dirty),
        "load_average": round(os.getloadavg()[0], 2),
    }


def write_stamped(path: Path, report: dict, stamp: dict) -> None:
    """``report`` with its stamp, written to a temporary file and renamed (never half a file)."""
    from genarm_local.core.atomic import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps({"stamp": stamp, **report}, indent=2), encoding="utf-8")


def describe(stamp: dict | None) -> str:
    """One line for a report section."""
    if not stamp:
        return "without a stamp (written before stamps were recorded: date, machine and commit unknown)"
    load = f" (load average {stamp['load_average']:g} at the start)" if "load_average" in stamp else ""
    return f"{stamp['date']} on {stamp['machine']}{load}, commit {stamp['commit']}"
