"""Chat templates: which one a model gets, the plain transcript, and hostile Jinja templates that must fail safely."""

from __future__ import annotations

import time

import pytest
from cli_helpers import EXACT, assert_one_line_error, run_cli

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def vocab(gguf_model):
    """The tiny base: its GGUF has a ChatML template of its own (tests/conftest.py)."""
    from genarm_local.core.native import Model

    with Model(gguf_model("llama_small", "f32"), vocab_only=True) as model:
        yield model


@pytest.fixture(scope="module")
def no_template(gguf_model, tmp_path_factory):
    """The tiny base without tokenizer.chat_template: what a pretrained GGUF looks like."""
    import gguf

    from genarm_local.core.native import Model

    source = gguf_model("llama_small", "f32")
    out = tmp_path_factory.mktemp("plain") / "pretrained.gguf"
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, arch=reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "tokenizer.chat_template"):
            continue
        writer.add_key_value(name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with Model(out, vocab_only=True) as model:
        assert model.chat_template is None
    return out


def test_builtin_template_by_name_only(vocab):
    from genarm_local.core.chat_template import render_builtin, resolve_template

    assert render_builtin("gemma", MESSAGES) == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    template = resolve_template("gemma", vocab)
    assert template.kind == "builtin" and template.render(vocab, MESSAGES).add_bos


def test_the_gguf_template_is_the_default(vocab):
    from genarm_local.core.chat_template import resolve_template

    rendered = resolve_template(None, vocab).render(vocab, MESSAGES)
    assert rendered.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not rendered.add_bos and not rendered.stop_at_turns


def test_a_model_without_template_chats_in_plain_transcript(no_template):
    """A pretrained base gets "User: …\\nAssistant:" and the reply ends at the next "User:" turn, not llama.cpp's
    built-in template for its architecture."""
    from genarm_local.core.chat_template import resolve_template
    from genarm_local.core.native import Model

    with Model(no_template, vocab_only=True) as model:
        template = resolve_template(None, model)
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": " Hi there "},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How are you?"},
        ]
        rendered = template.render(model, messages)
    assert template.kind == "plain"
    assert rendered.text == "System: Be brief.\nUser: Hi there\nAssistant: Hello.\nUser: How are you?\nAssistant:"
    assert rendered.add_bos and rendered.stop_at_turns


def test_plain_chat_stops_at_the_next_turn(no_template):
    """Through the API: the reply never contains the next turn ("User:" or any other speaker's label)."""
    import re

    from genarm_local import GuidedModel

    with GuidedModel(no_template, n_ctx=256, n_threads=1) as model:
        for seed in range(6):
            reply = model.chat([{"role": "user", "content": "The history of the bicycle"}], max_tokens=48, seed=seed)
            assert not re.search(r"\n\s*[A-Z][\w'-]*( [A-Z][\w'-]*)?:", reply.text), reply.text


def test_template_from_file_and_source(vocab, tmp_path):
    from genarm_local.core.chat_template import resolve_template

    source = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(source)
    for choice in (source, str(path)):
        rendered = resolve_template(choice, vocab).render(vocab, MESSAGES)
        assert (rendered.text, rendered.add_bos) == ("[user] Hi\n", False)


def test_unknown_name_and_bad_syntax_are_refused(vocab):
    from genarm_local.core.chat_template import resolve_template
    from genarm_local.core.errors import ChatTemplateError

    with pytest.raises(ChatTemplateError, match="no template of that name.*chatml"):
        resolve_template("no-such-template", vocab)
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        resolve_template("{% for m in messages %}", vocab)


HOSTILE = {
    "mutation": ("{{ messages.append(messages[0]) }}", "unsafe"),
    "attribute walk": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox"),
    "globals walk": ("{{ raise_exception.__globals__['__builtins__'] }}", "sandbox"),
    "nested loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = i * j %}{% endfor %}{% endfor %}",
        "within",
    ),
    "memory": ("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
               "{% endfor %}{{ ns.s | length }}", "memory"),
    "output": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "characters"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_templates_fail_with_one_error(vocab, case):
    """Untrusted templates: no code execution, no hang, no memory exhaustion — a ChatTemplateError within seconds,
    and the renderer keeps working for the next template."""
    from genarm_local.core.chat_template import resolve_template
    from genarm_local.core.errors import ChatTemplateError

    source, words = HOSTILE[case]
    template = resolve_template(source, vocab)
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=words):
        template.render(vocab, MESSAGES)
    assert time.monotonic() - start < 15
    assert resolve_template(None, vocab).render(vocab, MESSAGES).text.startswith("<|im_start|>user")


def test_hostile_template_ends_the_chat_command(gguf_model, tmp_path):
    """`chat --chat-template FILE` with a runaway template: one line, exit 2, before any turn."""
    path = tmp_path / "evil.jinja"
    path.write_text(HOSTILE["nested loops"][0])
    base = gguf_model("llama_small", "f32")
    result = run_cli("chat", "-m", base, *EXACT, "--chat-template", path, cwd=tmp_path, input="Hello\nHi again\n")
    assert_one_line_error(result, "evil.jinja", "did not finish")
    assert result.stdout == ""
