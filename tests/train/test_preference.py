"""The GenARM loss, response-only masking, and the preference data formats (genarm_local/train/loss.py and data.py)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from genarm_local.core.errors import InputNotFoundError, PreferenceDataError, TokenizerMismatchError
from genarm_local.train.data import TokenizedPair, load_preferences, pairs_from_rows, tokenize_pairs, truncate
from genarm_local.train.loss import anchor_penalty, batch_logps, collate, genarm_loss, sequence_logps

# ---- the loss ------------------------------------------------------------------------------------------------


def test_loss_equals_hand_computed_values():
    import torch

    chosen, rejected = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    losses = genarm_loss(chosen, rejected, beta=0.5, gamma=0.25)
    # −log σ(z) = log(1 + e^−z), z = 0.5·(−3 + 5) − 0.25 = 0.75 and z = 0.5·(−10 + 4) − 0.25 = −3.25
    assert losses.tolist() == pytest.approx([0.38687100611489994, 3.288041371687783], rel=1e-6)
    # the paper's defaults β = 0.05, γ = 0: z = 0.05·(−12 + 20) = 0.4
    assert genarm_loss(torch.tensor([-12.0]), torch.tensor([-20.0])).item() == pytest.approx(0.5130152523999526)


def test_label_smoothing_has_a_finite_optimum():
    import torch

    # ε = 0.1: −0.9·log σ(z) − 0.1·log σ(−z) at z = 2 (β = 0.5, Δ = 4): log(1 + e^−2)·0.9 + log(1 + e^2)·0.1
    loss = genarm_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log1p(math.exp(-2)) + 0.1 * math.log1p(math.exp(2)), rel=1e-6)
    # the gradient vanishes at z* = log(0.9 / 0.1) and pushes back beyond it; ε = 0 keeps pushing forever
    for z, sign in ((math.log(9.0) - 0.5, -1), (math.log(9.0) + 0.5, 1)):
        chosen = torch.tensor([z], requires_grad=True)
        genarm_loss(chosen, torch.tensor([0.0]), beta=1.0, label_smoothing=0.1).sum().backward()
        assert math.copysign(1, chosen.grad.item()) == sign
    chosen = torch.tensor([math.log(9.0)], requires_grad=True)
    genarm_loss(chosen, torch.tensor([0.0]), beta=1.0, label_smoothing=0.1).sum().backward()
    assert abs(chosen.grad.item()) < 1e-6
    chosen = torch.tensor([50.0], requires_grad=True)
    genarm_loss(chosen, torch.tensor([0.0]), beta=1.0).sum().backward()
    assert chosen.grad.item() < 0


def test_anchor_is_the_chosen_negative_log_likelihood_per_token():
    import torch

    assert anchor_penalty(torch.tensor([-30.0, -10.0]), torch.tensor([5.0, 4.0])).tolist() == [6.0, 2.5]
    # relative to the base: (−20 − (−30)) / 5 below it; 2 nats above the base's −12: no penalty
    relative = anchor_penalty(torch.tensor([-30.0, -10.0]), torch.tensor([5.0, 4.0]), torch.tensor([-20.0, -12.0]))
    assert relative.tolist() == [2.0, 0.0]
    # up to 1 nat/token above the base: −12 + 4 = −8 is the target of the second, 0.5 nat/token short of it
    over = anchor_penalty(torch.tensor([-30.0, -10.0]), torch.tensor([5.0, 4.0]), torch.tensor([-20.0, -12.0]), 1.0)
    assert over.tolist() == [3.0, 0.5]


def test_sequence_logps_by_hand():
    import torch

    # vocab of 3; row 0 has two response tokens, row 1 one
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [0.0, math.log(3.0), 0.0]])
    targets, rows = torch.tensor([2, 0, 1]), torch.tensor([0, 0, 1])
    expected = [math.log(1 / 3) + math.log(2 / 4), math.log(3 / 5)]
    assert sequence_logps(logits, targets, rows, 2).tolist() == pytest.approx(expected, rel=1e-6)


def test_collate_masks_prompt_and_padding():
    pairs = [TokenizedPair([5, 6, 7], [8, 9], [10]), TokenizedPair([5], [11, 12, 13], [14, 15])]
    input_ids, attention_mask, predict_mask = collate(pairs, pad_id=0)
    # rows: chosen of both pairs, then rejected of both
    assert input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 11, 12, 13, 0], [5, 6, 7, 10, 0], [5, 14, 15, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    # the logits at position t count only where they predict a response token (t + 1 is in the response)
    assert predict_mask.int().tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 1, 0, 0], [1, 1, 0, 0, 0]]


def test_prompt_and_padding_logits_never_count():
    """A stub model whose logits are NaN everywhere except where a response token is predicted: the summed
    log-probabilities are finite and equal the hand sum over response tokens only."""
    import torch

    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6]), TokenizedPair([1], [2, 3, 4], [5, 6])]
    input_ids, attention_mask, predict_mask = collate(pairs, pad_id=0)
    torch.manual_seed(0)
    full = torch.randn(*input_ids.shape, 8)
    poisoned = torch.where(predict_mask.unsqueeze(-1), full, torch.full_like(full, float("nan")))

    def model(input_ids, attention_mask, logits_to_keep, use_cache):
        return SimpleNamespace(logits=poisoned[logits_to_keep])

    got = batch_logps(model, input_ids, attention_mask, predict_mask)
    logp = torch.log_softmax(full, -1)
    expected = []
    for row, (prompt, reply) in enumerate(
        [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    ):
        seq = prompt + reply
        expected.append(sum(logp[row, t - 1, seq[t]].item() for t in range(len(prompt), len(seq))))
    assert torch.isfinite(got).all()
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_padded_batch_equals_sequences_one_by_one(hf_model):
    """On a real model: one padded batch of mixed lengths gives each sequence the log-probability it has alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_model("llama_small"), dtype=torch.float32).eval()
    pairs = [TokenizedPair([10, 20, 30, 40], [50, 60], [70]), TokenizedPair([15, 25], [35, 45, 55, 65], [75, 85])]
    with torch.no_grad():
        got = batch_logps(model, *collate(pairs, pad_id=0))
        expected = []
        for prompt, reply in [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]:
            logp = torch.log_softmax(model(torch.tensor([prompt + reply])).logits[0], -1)
            seq = prompt + reply
            expected.append(sum(logp[t - 1, seq[t]].item() for t in range(len(prompt), len(seq))))
    assert got.tolist() == pytest.approx(expected, rel=1e-4)


# ---- formats -------------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_trl_rows_with_skips_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q1", "chosen": " good", "rejected": " bad"},
            "",
            {"prompt": "Q2", "chosen": " same", "rejected": " same"},
            {"prompt": "Q3", "chosen": "", "rejected": " bad"},
            {"prompt": "  ", "chosen": " a", "rejected": " b"},
            {"prompt": "Q4", "chosen": " yes", "rejected": " no"},
        ],
    )
    data = load_preferences(path)
    assert data.format == "trl"
    assert [(p.prompt, p.chosen, p.rejected, p.line) for p in data.pairs] == [
        ("Q1", " good", " bad", 1),
        ("Q4", " yes", " no", 6),
    ]
    assert data.skipped == {"chosen == rejected": 1, "empty field": 2}


def test_hh_rlhf_split_at_last_assistant_turn():
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke."
    data = pairs_from_rows(
        [{"chosen": history + "\n\nAssistant: A funny one.", "rejected": history + "\n\nAssistant: No."}]
    )
    assert data.format == "hh"
    (pair,) = data.pairs
    assert pair.prompt == history + "\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" A funny one.", " No.")


def test_chat_formats():
    user = {"role": "user", "content": "Hi"}
    shared = pairs_from_rows(
        [
            {
                "chosen": [user, {"role": "assistant", "content": "Hello!"}],
                "rejected": [user, {"role": "assistant", "content": "Go away."}],
            }
        ]
    )
    with_prompt = pairs_from_rows(
        [
            {
                "prompt": [user],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}],
            }
        ]
    )
    assert shared.format == with_prompt.format == "chat"
    assert shared.pairs[0].prompt == with_prompt.pairs[0].prompt == [user]
    assert shared.pairs[0].chosen == with_prompt.pairs[0].chosen == [{"role": "assistant", "content": "Hello!"}]


@pytest.mark.parametrize(
    "lines, words",
    [
        (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": '], ["p.jsonl:2", "malformed"]),
        (['{"question": "a", "answer": "b"}'], ["p.jsonl:1", "unrecognized", "TRL"]),
        (
            ['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "b"}'],
            ["p.jsonl:2", "rejected"],
        ),
        (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '["a", "b"]'], ["p.jsonl:2", "JSON object"]),
        (['{"chosen": "no turn marker", "rejected": "at all"}'], ["p.jsonl:1", "Assistant"]),
        (["", "  "], ["empty"]),
        (['{"prompt": "a", "chosen": "b", "rejected": "b"}'], ["every row was skipped", "chosen == rejected"]),
    ],
)
def test_bad_files_name_the_line(tmp_path, lines, words):
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    with pytest.raises(PreferenceDataError) as info:
        load_preferences(path)
    for word in words:
        assert word in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputNotFoundError, match="nope.jsonl"):
        load_preferences(tmp_path / "nope.jsonl")


# ---- tokenization --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_trl_tokens_end_with_eos(tokenizer):
    data = pairs_from_rows([{"prompt": "Once upon a time", "chosen": " the sea", "rejected": " the dog"}])
    (pair,) = tokenize_pairs(data, tokenizer, max_length=64, max_prompt_length=32)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert pair.prompt == encode("Once upon a time")
    assert pair.chosen == encode(" the sea") + [tokenizer.eos_token_id]
    assert pair.rejected == encode(" the dog") + [tokenizer.eos_token_id]
    # --no-eos: continuations cut at a length limit did not end there
    (cut,) = tokenize_pairs(data, tokenizer, max_length=64, max_prompt_length=32, eos=False)
    assert cut.chosen == encode(" the sea") and cut.rejected == encode(" the dog")


def test_chat_rows_rendered_with_the_template(tokenizer):
    user = {"role": "user", "content": "Hi"}
    data = pairs_from_rows(
        [
            {
                "prompt": [user],
                "chosen": [{"role": "assistant", "content": "Hello"}],
                "rejected": [{"role": "assistant", "content": "No"}],
            }
        ]
    )

    def render(messages, generation):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    (pair,) = tokenize_pairs(data, tokenizer, 64, 32, render=render)
    assert tokenizer.decode(pair.prompt) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(pair.chosen) == "Hello<|im_end|>\n"
    assert tokenizer.decode(pair.rejected) == "No<|im_end|>\n"
    with pytest.raises(TokenizerMismatchError, match="no chat template"):
        tokenize_pairs(data, tokenizer, 64, 32, render=None)


def test_data_in_another_models_chat_markup_is_refused(tokenizer):
    gemma_style = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    data = pairs_from_rows([{"prompt": gemma_style, "chosen": "Hello<end_of_turn>", "rejected": "No<end_of_turn>"}])
    with pytest.raises(TokenizerMismatchError, match="<start_of_turn>"):
        tokenize_pairs(data, tokenizer, 64, 32)
    chatml = pairs_from_rows([{"prompt": "<|im_start|>user\nHi<|im_end|>\n", "chosen": "a", "rejected": "b"}])
    assert tokenize_pairs(chatml, tokenizer, 64, 32)[0].prompt[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_a_chat_template_of_another_tokenizer_is_refused(tokenizer):
    data = pairs_from_rows(
        [
            {
                "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No"}],
            }
        ]
    )

    def gemma_template(messages, generation):
        text = "".join(f"<start_of_turn>{m['role']}\n{m['content']}<end_of_turn>\n" for m in messages)
        return text + ("<start_of_turn>model\n" if generation else "")

    with pytest.raises(TokenizerMismatchError, match="template and the tokenizer do not belong together"):
        tokenize_pairs(data, tokenizer, 64, 32, render=gemma_template)


def test_truncation_keeps_prompt_end_and_bos_then_cuts_responses():
    prompt, chosen, rejected = [1, 10, 11, 12, 13, 14], [20, 21, 22, 23], [30, 31]
    pair = truncate(prompt, chosen, rejected, max_length=7, max_prompt_length=3, bos_id=1)
    assert pair.prompt == [1, 13, 14]  # BOS + the last tokens
    assert (pair.chosen, pair.rejected) == ([20, 21, 22, 23], [30, 31])
    pair = truncate(prompt, chosen, rejected, max_length=5, max_prompt_length=3, bos_id=None)
    assert pair.prompt == [12, 13, 14] and pair.chosen == [20, 21] and pair.rejected == [30, 31]
    # short enough: untouched
    assert truncate([1, 2], [3], [4], 8, 4, None) == TokenizedPair([1, 2], [3], [4])
