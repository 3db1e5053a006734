"""Preferences learned where you chat, on the server: the web chat's A/B buttons under side-by-side replies (in a
real headless chromium, as test_web.py drives it) and POST /v1/preferences append TRL pairs to the --prefs file that
train reads back; POST /v1/arms loads an ARM into the running server, which /v1/models lists at once and requests
weight like any other (through the real openai client). Both under the API key; bad input is a 4xx OpenAI error."""

from __future__ import annotations

import json

import pytest
from cli_helpers import EXACT, assert_one_line_error, run_cli
from test_errors import assert_error

KEY = "s3cret"
N_CTX = 256
SAMPLED = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the bicycle."}]


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    from live_server import running_server

    cwd = tmp_path_factory.mktemp("serve-prefs")
    (cwd / "key.txt").write_text(KEY + "\n")
    args = ["-m", files["base"], "--arm", f"kind={files['lora']}:1.5", *EXACT, "-c", N_CTX, "-np", 2]
    with running_server(*args, "--api-key-file", cwd / "key.txt", "--prefs", "prefs.jsonl", cwd=cwd) as running:
        yield running


def prefs_rows(server) -> list[dict]:
    path = server.log.parent / "prefs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def post(server, path: str, body, headers=AUTH, raw: bytes | None = None):
    return server.request("POST", path, body, headers=headers, raw=raw)


def test_preferences_are_appended_where_the_server_says(server):
    from genarm_local.train.data import load_preferences

    path = server.log.parent / "prefs.jsonl"
    assert f"preferences chosen in the web chat go to {path}" in server.log.read_text()  # at start-up
    before = len(prefs_rows(server))
    parts = [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "the bicycle.\u2028"}]
    bodies = [
        {"messages": MESSAGES, "chosen": " Two wheels.", "rejected": " No."},
        {"messages": [{"role": "user", "content": parts}], "chosen": "Pedals.", "rejected": "Nothing."},
    ]
    for body in bodies:
        status, _, answer = post(server, "/v1/preferences", body)
        assert status == 200 and answer == {"object": "preference", "path": str(path)}, answer
    rows = prefs_rows(server)[before:]
    assert rows[0] == {
        "prompt": MESSAGES,
        "chosen": [{"role": "assistant", "content": " Two wheels."}],
        "rejected": [{"role": "assistant", "content": " No."}],
    }
    assert rows[1]["prompt"] == [{"role": "user", "content": "Tell me about the bicycle.\u2028"}]
    pairs = load_preferences(path).pairs[before:]
    assert [(p.prompt, p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [
        (MESSAGES, " Two wheels.", " No."),
        (rows[1]["prompt"], "Pedals.", "Nothing."),
    ]


def test_bad_preferences_are_400_and_nothing_is_written(server):
    before = len(prefs_rows(server))
    good = {"messages": MESSAGES, "chosen": "a", "rejected": "b"}
    assert_error(post(server, "/v1/preferences", good, headers={}), 401, code="invalid_api_key")
    assert_error(post(server, "/v1/preferences", {"messages": MESSAGES, "chosen": "a"}), 400, "rejected")
    assert_error(post(server, "/v1/preferences", dict(good, messages=[])), 400, "messages")
    assert_error(post(server, "/v1/preferences", dict(good, chosen=3)), 400, "chosen")
    assert_error(post(server, "/v1/preferences", dict(good, winner="a")), 400, "winner")  # a typo is not ignored
    assert_error(post(server, "/v1/preferences", dict(good, rejected="a")), 400, "the same")
    assert_error(post(server, "/v1/preferences", dict(good, chosen="  ")), 400, "empty")
    last_assistant = dict(good, messages=[*MESSAGES, {"role": "assistant", "content": "Hi"}])
    assert_error(post(server, "/v1/preferences", last_assistant), 400, "not an assistant")
    assert_error(post(server, "/v1/preferences", None, raw=b'{"messages": ['), 400, "not valid JSON")
    assert len(prefs_rows(server)) == before


def test_an_arm_loaded_into_the_running_server(server, files):
    from genarm_local import GuidedModel

    client = server.client(KEY)
    before = {card.id: card.model_extra["arms"] for card in client.models.list().data}
    base_id = next(iter(before))
    assert set(before) == {base_id, f"{base_id}+kind"}
    status, _, answer = post(server, "/v1/arms", {"path": str(files["big"]), "name": "big", "alpha": 0.5})
    assert status == 200, answer
    assert answer == {
        "object": "arm",
        "name": "big",
        "path": str(files["big"]),
        "alpha": 0.5,
        "model": f"{base_id}+big",
    }
    cards = {card.id: card.model_extra["arms"] for card in client.models.list().data}
    assert cards[f"{base_id}+big"] == {"kind": 0.0, "big": 0.5}
    assert cards[f"{base_id}+kind+big"] == {"kind": 1.5, "big": 0.5}  # the new default: every ARM at its α
    for name, arms in before.items():  # the names listed before mean what they meant, the new ARM off
        assert cards[name] == {**arms, "big": 0.0}

    def reply(model: str, arms: dict | None = None) -> str:
        extra = {"top_k": 0, "min_p": 0.0, **({"arms": arms} if arms else {})}
        answer = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=16, temperature=1.0, top_p=1.0, seed=7, extra_body=extra
        )
        return answer.choices[0].message.content

    options = dict(n_ctx=N_CTX, n_threads=1, kv_cache_type="f32", flash_attn=False)
    with GuidedModel(files["base"], {str(files["big"]): 0.5}, **options) as local:
        expected = local.chat(MESSAGES, max_tokens=16, seed=7, **SAMPLED).text
        alone = local.chat(MESSAGES, max_tokens=16, seed=7, weights={local.arms[0].name: 0}, **SAMPLED).text
    assert expected != alone
    assert reply(f"{base_id}+big") == expected == reply(base_id, {"big": 0.5})  # by model name or by weight
    assert reply(base_id) == alone


def test_arms_that_cannot_load_are_400_and_the_server_goes_on(server, files, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(files["big"].read_bytes()[: 1 << 16])  # its header, not its tensors
    assert_error(post(server, "/v1/arms", {"path": str(files["big"])}, headers={}), 401, code="invalid_api_key")
    assert_error(post(server, "/v1/arms", {"path": str(tmp_path / "nope.gguf")}), 400, "nope.gguf", "no such file")
    assert_error(post(server, "/v1/arms", {"path": str(junk)}), 400, "not a GGUF file")
    assert_error(post(server, "/v1/arms", {"path": str(truncated)}), 400, "truncated.gguf", code="invalid_arm")
    assert_error(post(server, "/v1/arms", {"path": str(files["lora"]), "name": "again"}), 400, "already loaded")
    assert_error(post(server, "/v1/arms", {"path": str(junk), "name": "a+b"}), 400, "name")
    assert_error(post(server, "/v1/arms", {"path": str(junk), "weight": 1}), 400, "weight")
    assert_error(post(server, "/v1/arms", {"path": ""}), 400, "path")
    arms = [arm for card in server.client(KEY).models.list().data for arm in card.model_extra["arms"]]
    assert set(arms) <= {"kind", "big"}
    status, _, body = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and server.process.poll() is None


def test_a_prefs_file_in_no_folder_fails_at_start_up(files, tmp_path):
    result = run_cli("serve", "-m", files["base"], "--prefs", tmp_path / "no" / "p.jsonl", cwd=tmp_path)
    assert_one_line_error(result, "--prefs", "existing folder")


@pytest.mark.slow
def test_web_choices_under_side_by_side_replies(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from test_web import browser

    path = server.log.parent / "prefs.jsonl"
    shown = lambda text: " ".join(text.split())  # noqa: E731  (the page trims a reply's leading space)
    with browser() as page:
        wait = WebDriverWait(page, 120)
        page.get(server.url + "/")
        wait.until(lambda page: page.find_element(By.ID, "key-box").is_displayed())  # 401: the page asks
        page.find_element(By.ID, "key").send_keys(KEY, Keys.TAB)
        wait.until(lambda page: page.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        page.find_element(By.ID, "compare").click()
        page.find_element(By.ID, "max-tokens").clear()
        page.find_element(By.ID, "max-tokens").send_keys("12")
        history: list[dict] = []
        for turn, (message, pick) in enumerate([("Tell me about the bicycle.", "base"), ("And then?", "guided")], 1):
            page.find_element(By.ID, "message").send_keys(message)
            page.find_element(By.ID, "send").click()
            wait.until(lambda page, turn=turn: len(page.find_elements(By.CSS_SELECTOR, ".choice")) == turn)
            base, guided = (box.text for box in page.find_elements(By.CSS_SELECTOR, ".reply .text")[-2:])
            before = len(prefs_rows(server))
            page.find_elements(By.CSS_SELECTOR, f".choice button[data-prefer={pick}]")[-1].click()
            wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, ".choice")[-1].get_attribute("data-saved"))
            assert page.find_elements(By.CSS_SELECTOR, ".choice .saved")[-1].text == f"saved to {path}"
            assert not page.find_element(By.ID, "error").is_displayed()
            (row,) = prefs_rows(server)[before:]
            history.append({"role": "user", "content": message})
            assert row["prompt"] == history
            chosen, rejected = (base, guided) if pick == "base" else (guided, base)
            assert shown(row["chosen"][0]["content"]) == shown(chosen) and chosen != rejected
            assert shown(row["rejected"][0]["content"]) == shown(rejected)
            guided_reply = row["chosen" if pick == "guided" else "rejected"][0]["content"]
            history.append({"role": "assistant", "content": guided_reply})  # the chat goes on with the guided one
