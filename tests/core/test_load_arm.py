"""Loading an ARM into a running model (GuidedModel.load_arm → Engine.add_arm): it then guides exactly as if it had
been loaded at first, generations already running go on unchanged without it, jobs made before it run at α = 0 for
it, and a file that cannot be an ARM of this base is refused with the model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import PROMPT, model_files

EXACT = dict(n_ctx=256, n_threads=1, kv_cache_type="f32", flash_attn=False)
GREEDY = dict(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    return model_files(gguf_model, hf_model, lora_adapter, workdir)


@pytest.mark.parametrize("arm", ["lora", "big"], ids=["lora-adapter", "full-model"])
def test_a_loaded_arm_guides_as_one_loaded_at_first(files, arm):
    from genarm_local import GuidedModel

    with GuidedModel(files["base"], {str(files[arm]): 1.5}, **EXACT) as first:
        ids = first.tokenize(PROMPT)
        expected = first.next_token_logprobs(ids)
        expected_text = first.generate(ids, **GREEDY).text
    with GuidedModel(files["base"], {}, **EXACT) as model:
        base = model.next_token_logprobs(ids)  # a context of the base exists before the ARM comes
        spec = model.load_arm(files[arm], 1.5, name="kind")
        assert [a.name for a in model.arms] == ["kind"] and spec.alpha == 1.5
        assert model.arm_weights() == {"kind": 1.5}
        np.testing.assert_array_equal(model.next_token_logprobs(ids), expected)
        assert np.abs(expected - base).max() > 0.1  # the ARM moves the mix
        assert model.generate(ids, **GREEDY).text == expected_text
        np.testing.assert_array_equal(model.next_token_logprobs(ids, weights={"kind": 0}), base)


def test_running_generations_go_on_without_the_new_arm(files):
    import threading

    from genarm_local import GuidedModel
    from genarm_local.core.config import SamplingConfig
    from genarm_local.core.scheduler import Job

    # sampled, and long: the grammar rules out an early end, so the ARM joins while the stream still runs
    settings = dict(seed=5, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=100)
    settings["grammar"] = "root ::= [a-z ]{300,}"
    with GuidedModel(files["base"], {}, **EXACT) as alone:
        ids = alone.tokenize(PROMPT)
        expected = alone.generate(ids, **settings)
    assert len(expected.tokens) == 100
    with GuidedModel(files["base"], {}, **EXACT) as model:
        made_before = Job(ids, SamplingConfig.from_options(settings), model.engine.alphas())  # no ARM yet: []
        stream = model.stream(ids, **settings)
        next(stream)  # running: its first token is out
        model.load_arm(files["lora"], 2.0)  # joins between two of the stream's steps
        assert len(stream.result.tokens) + stream._events.qsize() < 100  # it did: the stream had not finished
        assert stream.drain().tokens == expected.tokens
        events, done = [], threading.Event()
        made_before.on_event = lambda event: (events.append(event), event.finish_reason and done.set())
        model.engine.submit([made_before])
        assert done.wait(60)
        assert [e.token for e in events if e.token is not None] == expected.tokens
        assert made_before.alphas == [0.0]  # filled in for the ARM it never knew
        assert model.generate(ids, **settings).tokens != expected.tokens  # new calls: the ARM at its α


def test_bad_files_are_refused_and_the_model_goes_on(files, gguf_model, tmp_path):
    from genarm_local import GuidedModel
    from genarm_local.core.config import ArmSpec
    from genarm_local.core.errors import (
        AdapterMismatchError,
        InputNotFoundError,
        InvalidOptionError,
        ModelClosedError,
        NotACheckpointError,
    )

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    locked = tmp_path / "locked.gguf"
    locked.write_bytes(files["lora"].read_bytes()[:64])
    locked.chmod(0)
    model = GuidedModel(files["base"], {str(files["lora"]): 1.0}, **EXACT)
    with model:
        expected = model.generate(PROMPT, **GREEDY).text
        with pytest.raises(InputNotFoundError, match="nope.gguf"):
            model.load_arm(tmp_path / "nope.gguf")
        with pytest.raises(NotACheckpointError, match="junk.gguf"):
            model.load_arm(junk)
        if not _readable(locked):  # root reads any file
            with pytest.raises(NotACheckpointError, match="cannot read"):
                model.load_arm(locked)
        with pytest.raises(InvalidOptionError, match="already loaded"):
            model.load_arm(files["lora"], name="again")  # the same file twice
        with pytest.raises(InvalidOptionError, match="already loaded"):
            model.load_arm(files["big"], name=files["lora"].stem)  # the same name twice
        with pytest.raises(InvalidOptionError, match="inside the ArmSpec"):
            model.load_arm(ArmSpec(files["big"], name="x"), 1.0)
        with GuidedModel(files["big"], {}, **EXACT) as other, pytest.raises(AdapterMismatchError):
            other.load_arm(files["lora"])  # an adapter of another base
        assert [arm.name for arm in model.arms] == [files["lora"].stem]
        assert model.generate(PROMPT, **GREEDY).text == expected
    with pytest.raises(ModelClosedError):
        model.load_arm(files["big"])


def _readable(path) -> bool:
    try:
        path.open("rb").close()
        return True
    except OSError:
        return False
