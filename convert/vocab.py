"""Tokenizer → GGUF metadata: the token table, its types and scores, merges, special ids, chat template.

Reading the tokenizer files is gguf-py's job (gguf.vocab.SentencePieceVocab / LlamaHfVocab / BpeVocab and
SpecialVocab); ours is choosing the right reader, the token types llama.cpp needs, padding to the embedding rows,
and naming the pre-tokenizer, which llama.cpp identifies by name rather than by regex.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

from genarm_local.core.errors import NotACheckpointError, UnsupportedArchitectureError

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# The Split regexes of the byte-level BPE pre-tokenizers llama.cpp implements, by the name it knows them under.
KNOWN_PRE_TOKENIZERS = {
    _CONTRACTIONS + r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _TAIL: "qwen2",
    _CONTRACTIONS + r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _TAIL: "llama-bpe",
}


def _bpe_pre_tokenizer(tokenizer_json: dict, source: Path) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            pattern = step.get("pattern", {})
            regex = pattern.get("Regex") or pattern.get("String")
            if regex in KNOWN_PRE_TOKENIZERS:
                return KNOWN_PRE_TOKENIZERS[regex]
            raise UnsupportedArchitectureError(
                f"{source}: the BPE pre-tokenizer regex {regex!r} is not one llama.cpp implements "
                f"(known: {', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))}, gpt-2)"
            )
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return "gpt-2"
    return "default"


def _read_tokens(model_dir: Path):
    """Pick gguf-py's reader for what the directory holds: SentencePiece model, byte-fallback BPE, byte-level BPE."""
    for reader in (SentencePieceVocab, LlamaHfVocab, BpeVocab):
        try:
            return reader(model_dir)
        except FileNotFoundError:
            continue
        except Exception as exc:  # gguf-py raises ValueError/KeyError/TypeError on malformed files
            raise NotACheckpointError(f"{model_dir}: cannot read the tokenizer ({exc})") from exc
    raise NotACheckpointError(
        f"{model_dir}: no tokenizer found (expected tokenizer.model, or tokenizer.json with a BPE model)"
    )


def write_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int, arch: str) -> None:
    """Write the tokenizer of an HF checkpoint directory, padded to ``n_vocab`` (the embedding rows)."""
    vocab = _read_tokens(model_dir)
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    if isinstance(vocab, LlamaHfVocab):
        _score_by_merge_rank(model_dir, scores)
    _mark_user_defined(model_dir, tokens, types)
    if len(tokens) > n_vocab:
        raise NotACheckpointError(
            f"{model_dir}: the tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows"
        )
    for i in range(len(tokens), n_vocab):  # llama.cpp takes n_vocab from the token list; it must match the rows
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)

    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        writer.add_tokenizer_pre(_bpe_pre_tokenizer(tokenizer_json, model_dir))
    else:
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if arch == "gemma3":
        writer.add_add_space_prefix(False)
    special = SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab)
    _add_special_from_template(model_dir, special)
    special.add_to_gguf(writer, quiet=True)


def _score_by_merge_rank(model_dir: Path, scores: list) -> None:
    """LlamaHfVocab scores every token -1000, but llama.cpp's SPM tokenizer merges the adjacent pair whose merged
    token scores highest, so equal scores merge left to right instead of in the tokenizer's order. Score each token
    by the rank of the first merge producing it (earlier merge, higher score), as SentencePiece's BPE scores do;
    tokens no merge produces score below every merge."""
    model = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges, token_ids = model.get("merges") or [], model.get("vocab") or {}
    scores[:] = [-float(len(merges))] * len(scores)
    for rank in reversed(range(len(merges))):  # reversed: the first merge producing a token sets its score
        merge = merges[rank]
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = token_ids.get(left + right)
        if token_id is not None and token_id < len(scores):
            scores[token_id] = -float(rank)


def _add_special_from_template(model_dir: Path, special: SpecialVocab) -> None:
    """A tokenizer.json post-processor template of the sequence alone means HF adds no BOS/EOS; gguf-py reads only
    templates with specials in them and would leave llama.cpp at its default (the SPM default adds BOS)."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return
    processor = json.loads(path.read_text(encoding="utf-8")).get("post_processor") or {}
    single = processor.get("single") or []
    if processor.get("type") == "TemplateProcessing" and [list(step) for step in single] == [["Sequence"]]:
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)


def _mark_user_defined(model_dir: Path, tokens: list, types: list) -> None:
    """Added tokens that are not special (HF ``special: false``) are USER_DEFINED, so llama.cpp prints them."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []
    for entry in added:
        token_id = entry.get("id")
        if token_id is not None and token_id < len(types) and not entry.get("special", False):
            types[token_id] = gguf.TokenType.USER_DEFINED
        elif token_id is not None and token_id < len(types):
            types[token_id] = gguf.TokenType.CONTROL


def copy_gguf_fields(writer: gguf.GGUFWriter, reader: gguf.GGUFReader, keep: Callable[[str], bool]) -> None:
    """Carry the metadata keys of a source GGUF that ``keep`` accepts over unchanged, types included."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not keep(key):  # GGUF.* are the reader's view of the header
            continue
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main_type, sub_type)


def copy_vocab_from_gguf(writer: gguf.GGUFWriter, reader: gguf.GGUFReader) -> None:
    """The tokenizer of a source GGUF, unchanged (the GGUF-source path of convert)."""
    copy_gguf_fields(writer, reader, lambda key: key.startswith("tokenizer."))
