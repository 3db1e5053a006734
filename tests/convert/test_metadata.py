"""An ARM's calibration metadata (genarm.calibration.*): the atomic rewrite keeps everything else byte for byte,
and the keys survive llama.cpp's quantizer and our converter's GGUF → GGUF round trip (but not a LoRA merge, which
changes the weights they describe)."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest

from genarm_local.core.arm_metadata import Calibration

CALIBRATION = Calibration(
    alphas=(0.125, 0.25, 0.5, 1.0),
    kl=(0.01, 0.04, 0.15, 0.5),
    tokens=(100, 101, 102, 103),
    distinct_2=(0.8, 0.78, 0.72, 0.72),
    rep_4=(0.01, 0.0, 0.02, 0.05),
    degenerate=(0.0, 0.0625, 0.0, 0.125),
    base_distinct_2=0.81,
    base_rep_4=0.015,
    base_degenerate=0.03125,
    recommended_alpha=0.41,
    prompts=4,
    samples=8,
    base_name="tiny",
    base_file="tiny.gguf",
    base_sha256="ab" * 32,
    max_tokens=25,
    seed=7,
    empty=(0.0, 0.0, 0.0, 0.0625),
    base_empty=0.0,
    distinct_2_share=0.875,
)


def same_calibration(a: Calibration, b: Calibration) -> bool:
    floats = ("alphas", "kl", "distinct_2", "rep_4", "degenerate", "base_distinct_2", "base_rep_4",
              "base_degenerate", "recommended_alpha", "empty", "base_empty", "distinct_2_share")  # fmt: skip
    exact = all(getattr(a, k) == getattr(b, k) for k in vars(a) if k not in floats)
    return exact and all(np.allclose(getattr(a, k), getattr(b, k), rtol=1e-6) for k in floats)


def fields_except(path, prefix="genarm."):
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", prefix))}


@pytest.fixture
def calibrated_model(gguf_model, tmp_path):
    from genarm_local.convert import write_calibration

    path = tmp_path / "arm.gguf"
    shutil.copy(gguf_model("llama_small", "f32"), path)
    write_calibration(path, CALIBRATION)
    return path


def test_rewrite_keeps_every_tensor_and_key(gguf_model, calibrated_model):
    from genarm_local.core.arm_metadata import read_calibration

    original = gguf_model("llama_small", "f32")
    assert read_calibration(original) is None
    assert same_calibration(read_calibration(calibrated_model), CALIBRATION)
    assert fields_except(calibrated_model) == fields_except(original)
    before, after = gguf.GGUFReader(original), gguf.GGUFReader(calibrated_model)
    assert [t.name for t in after.tensors] == [t.name for t in before.tensors]
    for old, new in zip(before.tensors, after.tensors, strict=True):
        assert old.tensor_type == new.tensor_type and np.array_equal(old.data, new.data)


def test_calibrating_again_replaces_the_record(calibrated_model):
    import dataclasses

    from genarm_local.convert import write_calibration

    from genarm_local.core.arm_metadata import read_calibration

    again = dataclasses.replace(CALIBRATION, alphas=(0.5, 1.0), kl=(0.2, 0.6), tokens=(9, 9), recommended_alpha=0.3)
    write_calibration(calibrated_model, again)
    assert same_calibration(read_calibration(calibrated_model), again)


def test_a_record_from_before_empty_replies_were_measured_is_read_with_the_bounds_of_its_time(calibrated_model):
    """The shipped ARMs' records have no genarm.calibration.empty nor .distinct_2_share: read as None, judged by the
    three measures and the former distinct-2 share."""
    import dataclasses

    from genarm_local.convert import write_calibration

    from genarm_local.core.arm_metadata import EMPTY_MARGIN, FORMER_DISTINCT_2_SHARE, PREFIX, read_calibration

    older = dataclasses.replace(CALIBRATION, empty=None, base_empty=None, distinct_2_share=None)
    write_calibration(calibrated_model, older)
    new_keys = {PREFIX + "empty", PREFIX + "base.empty", PREFIX + "distinct_2_share"}
    assert not new_keys & set(gguf.GGUFReader(calibrated_model).fields)
    read = read_calibration(calibrated_model)
    assert read.empty is None and read.base_empty is None and read.distinct_2_share is None
    assert same_calibration(dataclasses.replace(read, empty=CALIBRATION.empty, base_empty=CALIBRATION.base_empty,
                                                distinct_2_share=0.875), CALIBRATION)  # fmt: skip
    # no empty replies measured: their bound never binds
    assert [s[3] for s in read.slack()] == pytest.approx([EMPTY_MARGIN] * 4) and CALIBRATION.slack()[3][3] < 0
    # the empty reply at α = 1 (0.0625, base 0) is outside the bound of its own, inside the degenerate margin
    assert read.fluent() == [True, True, True, True] and CALIBRATION.fluent() == [True, True, True, False]
    # distinct-2 at α = 0.5 is 0.889× the base's: inside either share; 0.86× is inside the former share only
    assert read.slack()[2][0] == pytest.approx(0.72 / 0.81 - FORMER_DISTINCT_2_SHARE)
    tighter = dataclasses.replace(CALIBRATION, distinct_2=(0.8, 0.78, 0.7, 0.72), empty=None, base_empty=None)
    assert tighter.fluent()[2] is False and dataclasses.replace(tighter, distinct_2_share=None).fluent()[2]


def test_a_failed_rewrite_leaves_the_file(calibrated_model, monkeypatch):
    from genarm_local.convert import write_calibration

    before = calibrated_model.read_bytes()

    def broken(self, tensor):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", broken)
    with pytest.raises(OSError):
        write_calibration(calibrated_model, CALIBRATION)
    assert calibrated_model.read_bytes() == before
    assert [p.name for p in calibrated_model.parent.iterdir()] == [calibrated_model.name]  # no temporary file left


def test_metadata_survives_quantize(calibrated_model, tmp_path):
    """llama.cpp's quantizer copies every key-value pair of its input."""
    from genarm_local.convert import quantize

    from genarm_local.core.arm_metadata import read_calibration

    out = quantize(calibrated_model, tmp_path / "arm-q8.gguf", type="q8_0")
    assert same_calibration(read_calibration(out), CALIBRATION)


def test_metadata_survives_convert_but_not_a_merge(calibrated_model, tmp_path, lora_adapter):
    from genarm_local.convert import convert

    from genarm_local.core.arm_metadata import read_calibration

    f16 = convert(calibrated_model, tmp_path / "arm-f16.gguf", outtype="f16", progress=False)
    assert same_calibration(read_calibration(f16), CALIBRATION)
    q4 = convert(calibrated_model, tmp_path / "arm-q4.gguf", outtype="q4_k_m", progress=False)
    assert same_calibration(read_calibration(q4), CALIBRATION)
    merged = convert(calibrated_model, tmp_path / "merged.gguf", outtype="f32", lora=lora_adapter, progress=False)
    assert read_calibration(merged) is None


def test_calibrated_adapter_loads_over_its_base(gguf_model, hf_model, lora_adapter, tmp_path):
    from genarm_local.convert import convert, test_load_adapter, write_calibration

    from genarm_local.core.arm_metadata import read_calibration

    adapter = convert(hf_model("llama_small"), tmp_path / "a.gguf", "f16", lora=lora_adapter, adapter_only=True)
    write_calibration(adapter, CALIBRATION)
    test_load_adapter(gguf_model("llama_small", "f32"), adapter)
    assert same_calibration(read_calibration(adapter), CALIBRATION)
