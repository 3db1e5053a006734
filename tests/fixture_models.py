"""What the offline fixture models are made of: the tokenizer's data and specials, the chat template, the fidelity
text and each architecture's tiny config. A module of its own (not conftest.py) so that tests in any folder import
the same values: `from conftest import ...` picks whichever conftest was imported first."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The fidelity text: the start of the corpus the fixture models were fitted on (over 64 tokens), where their
# predictions are confident, as a real model's are on ordinary text.
FIDELITY_TEXT = (DATA / "corpus.txt").read_text(encoding="utf-8")[:600]

# name -> (HF class, config kwargs). "llama_small" is the small ARM, "llama_base" the larger base of the same
# tokenizer (weak-to-strong).
COMMON = dict(max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.06)
MODEL_SPECS = {
    "llama_small": (
        "LlamaForCausalLM",
        dict(
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=512,
            tie_word_embeddings=True,
        ),
    ),
    "llama_base": (
        "LlamaForCausalLM",
        dict(
            hidden_size=512,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=1024,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        dict(
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=512,
            tie_word_embeddings=False,
            vocab_pad=16,
        ),
    ),
    "qwen3": (
        "Qwen3ForCausalLM",
        dict(
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=128,
            intermediate_size=512,
            tie_word_embeddings=True,
        ),
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        dict(
            hidden_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            query_pre_attn_scalar=64,
            intermediate_size=512,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        ),
    ),
}
CONFIG_CLASSES = {
    "LlamaForCausalLM": "LlamaConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
    "Gemma3ForCausalLM": "Gemma3TextConfig",
}


def build_tokenizer():
    """Byte-level BPE (qwen2 pre-tokenizer regex) trained on the test corpus, as an HF fast tokenizer (the test
    fixtures' and bench/desktop_model.py's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # BPE training is deterministic: same corpus, same merges.
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(DATA / "corpus.txt")], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
