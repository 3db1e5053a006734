"""`genarm-local batch --ray`: the batch runner's rows spread over a pool of Ray actors, each owning one GuidedModel.

The driver plans the run exactly as the local backend does (runner.plan: the same row parsing, error rows, duplicate
check, resume from OUT, and the same groups: --batch-size rows at a time by their position in the input) and hands
the groups still to do to Ray Data as a dataset of one group per row. ``map_batches`` with the Replica class runs
them on a fixed pool of actors; each actor loads one GuidedModel once (with the local backend's slots and threads)
and runs a group through runner.run_group, the local backend's own code, so every row shares its steps with the same
rows and samples with the same seed as locally, and the text is the local backend's, with any number of replicas.

Results stream back to the driver, which appends each group's missing rows to OUT as they arrive (flushed and
fsynced, as locally) and shows the same progress bar. When every row is in, OUT is rewritten in input order.

Failures: Ray Data restarts a killed actor and retries the groups it had in flight (one at a time per actor, so a
kill loses at most one group of work); the driver writes each id once even if a retried group comes back twice. A
killed driver leaves OUT as a killed local run does: rerunning the command redoes only the groups with rows missing.

Why the driver reads IN rather than ``ray.data.read_json``: pyarrow's JSON reader turns the rows into one table,
so it fails the whole file on one malformed line, on ids that are strings in some rows and integers in others, or
on "stop" given as a string and as a list; it merges every row's "weights" into one struct (each row gains the
other rows' ARMs as nulls) and drops line numbers, which ids and seeds depend on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..core.api import GuidedModel
from ..core.config import ARMS_DIR, ArmSpec, LoadConfig, option
from ..core.errors import GenArmError, InputNotFoundError, InvalidOptionError, require
from .rows import Row, read_result_rows
from .runner import Plan, Sink, missing, run_group

LOCAL = "local"  # --ray without an address: start a Ray instance on this machine
STARTUP_TIMEOUT_S = 1800  # for every replica to load its model (a large one, from shared storage)


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide the Ray backend runs; the --ray flags are generated from these fields."""

    address: str | None = option(
        None,
        "run on Ray: without ADDRESS on a Ray instance started on this machine; 'auto' or ray://HOST:PORT joins a "
        "running cluster (pip install 'genarm-local[ray]')",
        flags=("--ray",),
        nargs="?",
        const=LOCAL,
        metavar="ADDRESS",
    )
    replicas: int | None = option(
        None, "with --ray: Ray actors, one model each (default: as many as the cluster's CPUs fit)", metavar="N"
    )
    threads_per_replica: int | None = option(
        None,
        "with --ray: CPUs each actor reserves, and its llama.cpp threads (default: -t, else all of this machine's "
        "cores, as the local backend uses)",
        metavar="T",
    )

    def __post_init__(self) -> None:
        for name in ("replicas", "threads_per_replica"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidOptionError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


# ---- what each actor loads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaSpec:
    """A LoadConfig that travels to other machines: the base and ARM paths made absolute, shipped ARMs kept by
    name (the package may be installed elsewhere on a worker), the embedded base left to the worker to find."""

    config: LoadConfig  # without its ARMs
    arms: tuple[tuple[str, str, float | None, str], ...]  # (kind "shipped" | "path", name or path, alpha, name)

    @classmethod
    def of(cls, config: LoadConfig, threads: int) -> ReplicaSpec:
        arms = []
        for arm in config.arms:
            shipped = arm.path.resolve().parent == ARMS_DIR
            where = ("shipped", arm.path.stem) if shipped else ("path", str(arm.path.expanduser().resolve()))
            arms.append((*where, arm.alpha, arm.name))
        base = None if config.base is None else str(Path(config.base).expanduser().resolve())
        return cls(dataclasses.replace(config, base=base, arms=(), n_threads=threads), tuple(arms))

    def load_config(self) -> LoadConfig:
        """The LoadConfig on this node; a path missing here is an error that names the node."""
        arms = []
        for kind, where, alpha, name in self.arms:
            path = ARMS_DIR / f"{where}.gguf" if kind == "shipped" else Path(where)
            _check_exists(path, f"ARM {name}")
            arms.append(ArmSpec(path, alpha, name))
        if self.config.base is not None:
            _check_exists(Path(self.config.base), "base model")
        return dataclasses.replace(self.config, arms=tuple(arms))


def _check_exists(path: Path, what: str) -> None:
    if not path.is_file():
        raise InputNotFoundError(
            f"{what} {path} does not exist on node {socket.gethostname()}; with --ray the model files must exist "
            "on every node (at the same path, e.g. on shared storage)"
        )


class Replica:
    """One Ray actor: a GuidedModel loaded once, then group after group of rows through the local runner."""

    def __init__(self, spec: ReplicaSpec, defaults: dict):
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.defaults = defaults
        self.model, self.failure = None, None
        try:
            self.model = GuidedModel(config=spec.load_config())
        except GenArmError as exc:
            # Returned with the first group rather than raised: Ray would restart the actor again and again, and
            # the driver could only show the error inside a remote traceback.
            self.failure = str(exc)

    def __call__(self, batch: dict) -> dict:
        results = []
        for group in batch["group"]:
            if self.failure is not None:
                results.append(json.dumps({"failure": self.failure}))
                continue
            rows = run_group([Row(**row) for row in json.loads(group)], self.model, self.defaults)
            results.append(json.dumps({"rows": rows}, ensure_ascii=False))
        return {"result": results, "replica": [self.name] * len(results)}


# ---- the driver ----------------------------------------------------------------------------------------------


@dataclass
class RayRun:
    """What a Ray run did: the sink's counts, and rows per replica process (a restarted actor is a new one)."""

    output: Path
    replicas: int
    threads: int
    rows_per_replica: Counter = dataclasses.field(default_factory=Counter)
    sink: Sink | None = None

    def open(self) -> Sink:
        """OUT, opened at the first result: a setup that fails on the replicas leaves no empty OUT behind."""
        if self.sink is None:
            self.sink = Sink(self.output)
        return self.sink

    @property
    def done(self) -> int:
        return self.sink.done if self.sink else 0

    @property
    def failed(self) -> int:
        return self.sink.failed if self.sink else 0


def connect(address: str):
    """The ray module, connected: to the running instance if this process has one, else per --ray ADDRESS."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # Ray Data's INFO lines would break the progress bar
    ray = require("ray", "ray")
    require("ray.data", "ray")
    if ray.is_initialized():
        return ray, False
    import logging

    options = dict(logging_level=logging.ERROR, configure_logging=True)
    try:
        if address == LOCAL:
            ray.init(address="local", include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise InvalidOptionError(f"--ray {address}: cannot connect to a Ray cluster there ({exc})") from None
    return ray, True


def run_on_ray(work: Plan, load: LoadConfig, defaults: dict, ray_config: RayConfig, progress) -> RayRun:
    """Generate every group of ``work`` on a pool of Ray actors (module docstring). The caller puts OUT in input
    order afterwards (sources.finish)."""
    threads = ray_config.threads_per_replica or load.threads
    spec = ReplicaSpec.of(load, threads)
    groups = work.groups
    run = RayRun(work.output, 0, threads)
    ray, started = connect(ray_config.address or LOCAL) if groups else (None, False)
    try:
        if groups:
            run.replicas = min(pool_size(ray, ray_config.replicas, threads, load.n_gpu_layers != 0), len(groups))
            _stream(ray, groups, spec, defaults, set(work.done), run, progress)
    finally:
        if run.sink:
            run.sink.close()
        if started:
            ray.shutdown()
    lost = {row.key for row in work.rows} - _keys(work.output)
    if lost:
        raise GenArmError(f"{len(lost)} rows came back from no replica (e.g. id {json.loads(min(lost))!r})")
    return run


def pool_size(ray, replicas: int | None, threads: int, gpus: bool) -> int:
    """--replicas, or as many actors as the cluster's CPUs (and GPUs) fit; more than fit is an error, since Ray
    would wait for them forever."""
    resources = ray.cluster_resources()
    cpus, gpu_count = resources.get("CPU", 0), resources.get("GPU", 0)
    fit = int(cpus // threads)
    if gpus:
        fit = min(fit, int(gpu_count))
    wanted = replicas or max(fit, 1)
    if wanted > fit:
        need = f"{threads} CPU{'s' * (threads > 1)}" + (" and 1 GPU" if gpus else "")
        raise InvalidOptionError(
            f"--replicas {wanted} do not fit the Ray cluster: each replica needs {need}, the cluster has {cpus:g} "
            f"CPUs and {gpu_count:g} GPUs (see --threads-per-replica)"
        )
    return wanted


def _stream(ray, groups: list[list[Row]], spec: ReplicaSpec, defaults: dict, written: set[str], run: RayRun, progress):
    """The dataset of groups through the actor pool; every result row that OUT lacks appended once, as it arrives."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is the local backend's
    # Groups go out once every replica has loaded its model: the pool shares the rows from the first group on, and
    # a pool the cluster cannot place fails with Ray's "Timed out while starting actors" instead of waiting forever.
    context.wait_for_min_actors_s = STARTUP_TIMEOUT_S
    items = [{"group": json.dumps([dataclasses.asdict(row) for row in group], ensure_ascii=False)} for group in groups]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    results = dataset.map_batches(
        Replica,
        fn_constructor_args=(spec, defaults),
        batch_size=1,
        batch_format="numpy",
        # one group in flight per actor: a killed actor loses one group, and the last groups spread evenly
        compute=ray.data.ActorPoolStrategy(size=run.replicas, max_tasks_in_flight_per_actor=1),
        num_cpus=run.threads,
        num_gpus=1 if spec.config.n_gpu_layers != 0 else None,
    )
    generated, start = 0, time.perf_counter()
    items = iter(results.iter_rows())
    try:
        for item in _starting(ray, items):
            result = json.loads(item["result"])
            if "failure" in result:
                raise GenArmError(f"replica {item['replica']}: {result['failure']}")
            rows = missing(result["rows"], written)
            run.open().write_all(rows)  # one fsync per group: the driver's cost per row is what limits the pool
            written.update(json.dumps(row["id"]) for row in rows)
            generated += sum(len(row.get("tokens", ())) for row in rows)
            run.rows_per_replica[str(item["replica"])] += len(rows)
            progress.update(len(rows))
            progress.set_postfix_str(f"{generated / (time.perf_counter() - start):.1f} tok/s", refresh=False)
    finally:
        items.close()  # stops the dataset's execution, and with it the actor pool, when we stop early


def _starting(ray, items):
    """``items``, with the pool's start-up timeout as a one-line error."""
    try:
        yield from items
    except ray.exceptions.GetTimeoutError as exc:
        raise GenArmError(
            f"the replicas did not all start within {STARTUP_TIMEOUT_S} s ({exc}); fewer --replicas, or check the "
            "cluster's free CPUs with `ray status`"
        ) from None


def _keys(path: Path) -> set[str]:
    return {json.dumps(row["id"]) for row in read_result_rows(path)} if path.exists() else set()
