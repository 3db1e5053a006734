"""The `genarm-local` command: one verb per module of this package, imported only when that verb runs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# numpy's OpenBLAS starts a pool of threads that do not block signals; the kernel may hand Ctrl-C to one of them,
# which leaves `chat` asleep at its prompt instead of leaving. The commands do no BLAS work worth threads (the mixing
# is our own kernel, whose workers block signals, as do our other threads: core.native.block_signals).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from ..core.errors import GenArmError  # noqa: E402

# verb -> (module, one-line help). Each module has add_arguments(parser) and main(args).
VERBS = {
    "demo": ("genarm_local.cli.demo", "the base vs GenARM-guided continuations, side by side, with the judges' scores"),
    "convert": ("genarm_local.cli.convert", "convert an HF checkpoint or GGUF (+ LoRA) to GGUF"),
    "quantize": ("genarm_local.cli.quantize", "quantize an F32/F16/BF16 GGUF with llama.cpp"),
    "chat": ("genarm_local.cli.chat", "guided chat in the terminal, streamed, with live ARM weights"),
    "generate": ("genarm_local.cli.generate", "guided completions of one prompt to stdout (text or JSON)"),
    "batch": ("genarm_local.cli.batch", "guided completions of a JSONL file of prompts, resumable"),
    "serve": ("genarm_local.cli.serve", "an OpenAI-compatible HTTP server with per-request ARM weights and a web chat"),
    "train": ("genarm_local.cli.train", "train an ARM (LoRA, GenARM loss) from preference data"),
    "calibrate": ("genarm_local.cli.calibrate", "find the strongest weight at which an ARM stays fluent; store it"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, where it says something: not for switches, empty lists and None (the
    help says what those mean), nor where the help already states its default. Epilogs (chat's command list) are
    printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unsaid = action.default is None or action.default == [] or action.default is argparse.SUPPRESS
        if action.nargs == 0 or unsaid or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genarm-local",
        description="GenARM test-time alignment on llama.cpp.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--traceback", "--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (module, help_text) in VERBS.items():
        sub = subparsers.add_parser(verb, help=help_text, description=help_text, formatter_class=HelpFormatter)
        # also accepted after the verb; SUPPRESS keeps the subparser from resetting a value given before it
        sub.add_argument(
            "--traceback", "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback"
        )
        importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verb, show_traceback = args.verb, args.traceback
    del args.verb, args.traceback
    try:
        status = importlib.import_module(VERBS[verb][0]).main(args)
    except GenArmError as exc:
        if show_traceback:
            raise
        print(f"genarm-local {verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"genarm-local {verb}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0  # a verb may return a status (batch: 1 if rows failed)


if __name__ == "__main__":
    sys.exit(main())
