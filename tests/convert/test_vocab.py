"""Tokenization: llama.cpp's ids for the converted vocabulary equal the HF tokenizer's ids."""

from __future__ import annotations

import pytest
from fixture_models import DATA, SPECIALS

VARIED = [
    *[line for line in (DATA / "corpus.txt").read_text(encoding="utf-8").splitlines() if line],
    "   leading spaces and trailing   ",
    "multiple\n\n\nnewlines\r\nand\ttabs\t\t\tend",
    "digits 1234567890 0.000001 12,345.67 ½ ²",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
    "emoji only 🤖🤖🤖 and a ZWJ family 👩‍❤️‍👨",
    "mixed scripts: Ωmega + 東京 + Москва + مرحبا + 🙂",
    "",
]


@pytest.mark.parametrize("name", ["llama_small", "qwen2"])
def test_llama_cpp_ids_equal_hf_ids(name, hf_model, gguf_model):
    from transformers import AutoTokenizer

    from genarm_local.core.native import Model

    tokenizer = AutoTokenizer.from_pretrained(hf_model(name))
    with Model(gguf_model(name, "f32"), vocab_only=True) as model:
        for text in VARIED:
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert model.tokenize(text, add_special=False, parse_special=True) == expected, text
            assert model.detokenize(expected, special=True) == tokenizer.decode(expected), text


def test_special_tokens_and_chat_template_carried(hf_model, gguf_model):
    from transformers import AutoTokenizer

    from genarm_local.core.native import Model

    tokenizer = AutoTokenizer.from_pretrained(hf_model("qwen2"))
    with Model(gguf_model("qwen2", "f16"), vocab_only=True) as model:
        assert model.meta("tokenizer.chat_template") == tokenizer.chat_template
        assert int(model.meta("tokenizer.ggml.eos_token_id")) == tokenizer.eos_token_id
        for special in SPECIALS:  # each special is one token, not split into bytes
            assert model.tokenize(special, add_special=False) == [tokenizer.convert_tokens_to_ids(special)]
        # qwen2's embedding is padded past the tokenizer; llama.cpp's vocabulary covers every row
        assert model.n_vocab == tokenizer.__len__() + 16
