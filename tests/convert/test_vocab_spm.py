"""SentencePiece tokenizers (Llama style): llama.cpp's ids for the converted vocabulary equal the HF tokenizer's ids.

The fixture trains a byte-fallback BPE SentencePiece model on tests/data/corpus.txt, wraps it in a transformers
LlamaTokenizer and saves three checkpoints of one tiny random Llama:

- "spm": tokenizer.model and tokenizer.json, so the converter reads tokenizer.model (gguf-py SentencePieceVocab);
- "hf_json": tokenizer.json only, as transformers 5 saves it (gguf-py LlamaHfVocab);
- "no_bos": like "spm", but the HF tokenizer adds no BOS.

"hf_json" relies on convert/vocab.py scoring tokens by merge rank (gguf-py's LlamaHfVocab scores them all -1000, and
llama.cpp's SPM tokenizer merges by score), "no_bos" on it reading add_bos from a BOS-less post-processor template.

Where HF (transformers 5's Metaspace pre-tokenizer) and llama.cpp part ways, at whitespace that opens the text or
follows a special token, llama.cpp follows SentencePiece itself; see test_leading_space_follows_sentencepiece.
"""

from __future__ import annotations

import shutil

import pytest
from fixture_models import DATA
from helpers import hf_logits, llama_logits, relative_max_error

F32_BOUND = 1e-4
F32_FLASH_ATTN_BOUND = 1e-3  # see test_f32_logits_match_hf
CORPUS = [line for line in (DATA / "corpus.txt").read_text(encoding="utf-8").splitlines() if line]
# Texts on which llama.cpp must give HF's ids exactly: none opens with whitespace, no text follows a special token.
AGREE = [
    *CORPUS,
    "a  b   c  trailing spaces   ",
    "multiple\n\n\nnewlines\r\nand\ttabs\t\t\tend",
    "digits 1234567890 0.000001 12,345.67 ½ ² 2025",
    "emoji only 🤖🤖🤖 and a ZWJ family 👩‍❤️‍👨",
    "mixed scripts: Ωmega + 東京 + Москва + مرحبا + 🙂",
    "unseen characters go to bytes: ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ ﷽",
    "a special token at the end</s>",
    "</s>",
    "",
]
# Whitespace at the start of the text or of a fragment after a special token.
LEADING_SPACE = [" Hello", "   leading spaces", "\tTab first", "\n\nnewlines first", "<s>Hello", "x</s> y", "<s> two"]
VOCAB_SIZE = 800  # 259 specials and bytes, about 290 characters (character_coverage 0.99), the rest merges


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """name -> (checkpoint dir, converted F32 GGUF), plus "sp": the trained sentencepiece processor."""
    import sentencepiece
    import torch
    from genarm_local.convert import convert
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    root = tmp_path_factory.mktemp("spm")
    # Llama's trainer settings, scaled down; BPE training is deterministic.
    sentencepiece.SentencePieceTrainer.train(
        input=str(DATA / "corpus.txt"),
        model_prefix=str(root / "spm"),
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=0.99,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    source = root / "source"
    source.mkdir()
    shutil.copy(root / "spm.model", source / "tokenizer.model")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.06,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()

    out = {"sp": sentencepiece.SentencePieceProcessor(model_file=str(root / "spm.model"))}
    for name, add_bos, keep_model_file in [("spm", True, True), ("hf_json", True, False), ("no_bos", False, True)]:
        tokenizer = LlamaTokenizer.from_pretrained(source, add_bos_token=add_bos)
        assert len(tokenizer) == VOCAB_SIZE
        checkpoint = root / name
        model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)  # transformers 5 writes tokenizer.json, not tokenizer.model
        if keep_model_file:
            shutil.copy(source / "tokenizer.model", checkpoint / "tokenizer.model")
        assert (checkpoint / "tokenizer.model").exists() == keep_model_file
        out[name] = (checkpoint, convert(checkpoint, root / f"{name}.gguf", outtype="f32", progress=False))
    return out


def _hf(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.mark.parametrize("name", ["spm", "hf_json"])
def test_llama_cpp_ids_equal_hf_ids(spm, name):
    from genarm_local.core.native import Model

    checkpoint, gguf_path = spm[name]
    tokenizer = _hf(checkpoint)
    byte_tokens = set()
    with Model(gguf_path, vocab_only=True) as model:
        assert model.meta("tokenizer.ggml.model") == "llama"
        for text in AGREE:
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = model.tokenize(text, add_special=False, parse_special=True)
            assert ids == expected, text
            if "</s>" not in text:  # SentencePiece itself agrees (it does not parse special tokens)
                assert ids == spm["sp"].encode(text), text
            byte_tokens |= {t for t in ids if model.token_text(t).startswith("<0x")}
    assert len(byte_tokens) >= 8  # the emoji and unseen characters really went through byte fallback


@pytest.mark.parametrize("name", ["spm", "hf_json", "no_bos"])
def test_add_special_matches_hf_bos(spm, name):
    from genarm_local.core.native import Model

    checkpoint, gguf_path = spm[name]
    tokenizer = _hf(checkpoint)
    with Model(gguf_path, vocab_only=True) as model:
        assert model.meta("tokenizer.ggml.add_bos_token") == ("false" if name == "no_bos" else "true")
        for text in [CORPUS[0], "x", ""]:
            expected = tokenizer(text)["input_ids"]
            assert (expected[:1] == [1]) == (name != "no_bos")
            assert model.tokenize(text, add_special=True, parse_special=True) == expected, text


@pytest.mark.parametrize("name", ["spm", "hf_json"])
def test_detokenize_round_trips(spm, name):
    from genarm_local.core.native import Model

    checkpoint, gguf_path = spm[name]
    tokenizer = _hf(checkpoint)
    with Model(gguf_path, vocab_only=True) as model:
        for text in AGREE:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text, text
            # Model.detokenize joins llama_token_to_piece(lstrip=0) pieces, so the space SentencePiece prefixed to
            # the text stays (llama_detokenize would drop it, as HF's Strip decoder does).
            prefix = "" if text.startswith("</s>") or not text else " "
            assert model.detokenize(ids, special=True) == prefix + text, text


@pytest.mark.parametrize("name", ["spm", "hf_json"])
def test_leading_space_follows_sentencepiece(spm, name):
    """Whitespace opening a fragment: transformers 5's LlamaTokenizer (Metaspace, prepend_scheme "first") prepends
    no "▁" when the text already starts with one, nor after a special token, while llama.cpp's SPM tokenizer
    (add_space_prefix) prepends "▁" to the text and to every fragment after a special token, as SentencePiece's
    add_dummy_prefix does. No GGUF key reproduces HF here: add_space_prefix=false would drop the "▁" of "Hello"."""
    from genarm_local.core.native import Model

    sp = spm["sp"]
    with Model(spm[name][1], vocab_only=True) as model:
        for text in LEADING_SPACE:
            expected = []
            for fragment in text.replace("<s>", "\0<s>\0").replace("</s>", "\0</s>\0").split("\0"):
                if fragment in ("<s>", "</s>"):
                    expected.append(sp.piece_to_id(fragment))
                elif fragment:
                    expected += sp.encode(fragment)
            assert model.tokenize(text, add_special=False, parse_special=True) == expected, text


def test_f32_logits_match_hf(spm):
    """F32 export vs HF, on the ids of the SentencePiece tokenizer (BOS first).

    Exact path: llama.cpp with flash attention off, whose F32 graph differs from HF by summation order only.
    Project path (helpers.llama_logits, llama.cpp's default context): flash attention is on, and llama.cpp's
    build_attn_mha (src/llama-graph.cpp) casts F32 K and V to F16 before ggml_flash_attn_ext, so the F32 KV cache
    does not make attention F32; that costs about 2.5e-4 of the logit range here.
    """
    import llama_cpp
    import numpy as np

    checkpoint, gguf_path = spm["spm"]
    ids = _hf(checkpoint)("\n".join(CORPUS)[:600])["input_ids"]
    assert len(ids) >= 64 and ids[0] == 1
    reference = hf_logits(checkpoint, ids)

    llm = llama_cpp.Llama(
        str(gguf_path),
        n_ctx=512,
        n_batch=512,
        logits_all=True,
        flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        n_threads=2,
        verbose=False,
    )
    try:
        llm.eval(ids)
        exact = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    assert reference.shape == exact.shape
    assert relative_max_error(reference, exact) < F32_BOUND

    assert relative_max_error(reference, llama_logits(gguf_path, ids)) < F32_FLASH_ATTN_BOUND
