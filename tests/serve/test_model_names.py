"""The model names the server lists, on the embedded base with the shipped ARMs: a name that switches on an ARM the
defaults load at 0 (concise) uses that ARM's recommended α, as a name carrying a loaded ARM does."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def model():
    from genarm_local import GuidedModel

    with GuidedModel(n_ctx=256) as guided:
        yield guided


def test_names_that_carry_an_arm_use_its_recommended_alpha(model):
    from genarm_local.serve.config import ServeConfig
    from genarm_local.serve.state import ServerState, model_id

    state = ServerState.__new__(ServerState)  # the names only: no server, no second model
    state.settings = ServeConfig()
    models = state._build_models(model)
    base = model_id(model)
    recommended = {arm.name: arm.recommended_alpha for arm in model.engine.arms}
    assert model.arm_weights()["concise"] == 0.0 and recommended["concise"] not in (0.0, 1.0)  # shipped off, calibrated
    assert models[f"{base}+concise"] == {"positive": 0.0, "concise": pytest.approx(recommended["concise"])}
    assert models[f"{base}+positive"] == {"positive": pytest.approx(recommended["positive"]), "concise": 0.0}
    assert models[f"{base}+positive+concise"] == pytest.approx(recommended)
    assert models[base] == {"positive": 0.0, "concise": 0.0}
