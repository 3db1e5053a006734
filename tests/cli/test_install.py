"""What an install carries: the HTTP stack is the `serve` extra, which the Python API and every other command never
import, and `serve` without it says which extra to install; Python run from the checkout imports the package (the
README's editable install builds the kernel in place)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cli_helpers import assert_one_line_error

REPO = Path(__file__).resolve().parents[2]
HTTP_STACK = ("fastapi", "uvicorn", "pydantic", "starlette")


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_api_and_the_other_commands_never_import_the_http_stack(tmp_path):
    code = (
        "import importlib, sys\n"
        "import genarm_local\n"
        "from genarm_local import GuidedModel, GenerationResponse, SamplingConfig\n"
        "import genarm_local.core.api, genarm_local.batch.runner\n"
        "from genarm_local.cli import VERBS, build_parser\n"
        "build_parser()\n"
        "for verb, (module, _) in VERBS.items():\n"
        "    importlib.import_module(module)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HTTP_STACK!r}))\n"
    )
    result = python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_serve_without_the_http_stack_names_the_extra(tmp_path):
    # the HTTP stack made unimportable (a None entry in sys.modules), as in an install without [serve]
    code = "import sys\nsys.modules['fastapi'] = None\nfrom genarm_local.cli import main\nsys.exit(main(['serve']))\n"
    assert_one_line_error(python(code, tmp_path), "pip install 'genarm-local[serve]'", "fastapi")


def test_python_run_from_the_checkout_imports_the_package():
    result = python("import genarm_local.core.mixing, genarm_local; print(genarm_local.__file__)", REPO)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve().is_relative_to(REPO)  # the checkout's own package, kernel included
