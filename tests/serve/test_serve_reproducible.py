"""What the README says the server reproduces, on the real embedded model with the shipped default ARMs at default
settings: a request alone gets the same text for the same seed whatever ran before it, the text the in-process API
gives."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The hotel we stayed at was"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from live_server import running_server

    with running_server(cwd=tmp_path_factory.mktemp("serve-real")) as running:
        yield running


def test_a_request_alone_gets_the_same_text_whatever_ran_before(server):
    from genarm_local import GuidedModel

    client = server.client()
    ask = lambda prompt, **options: client.completions.create(model="", prompt=prompt, seed=5, **options)  # noqa: E731
    first = ask(PROMPT, max_tokens=32).choices[0].text
    ask(PROMPT + " really nice, and", max_tokens=40)  # other requests through the same slots
    client.chat.completions.create(model="", messages=[{"role": "user", "content": PROMPT}], max_tokens=24)
    assert ask(PROMPT, max_tokens=32).choices[0].text == first
    with GuidedModel() as local:
        assert local.generate(PROMPT, max_tokens=32, seed=5).text == first
