"""The playground page (``GET /``) in a real headless Chromium, and the ``dhara``
streaming extension it relies on.

The server runs in this process with the small trained model, as in
test_serve.py. The browser tests need Playwright's Python package and a system
Chromium (``apt-get install chromium``; CI's ``.ci/run`` installs both); without
them they are skipped with the reason, while the API tests still run.
"""

import json
import shutil
import time
from pathlib import Path

import httpx
import mlx_lm
import openai
import pytest

import optiq_dhara.serve.engine as engine_module
from optiq_dhara.serve.app import ServerConfig, background_server, create_app
from optiq_dhara.serve.engine import Worker

TRAINED = Path(__file__).parent / "fixtures" / "dhara_tiny_trained"
MASK = json.loads((TRAINED / "config.json").read_text())["mask_token_id"]
KEY = "playground-key"
CODE = "class Record:\n\n    def __init__(self, name, value=None):"
STATS = {
    "mode",
    "prompt_tokens",
    "reused_tokens",
    "generated",
    "forwards",
    "rounds",
    "accepted_drafts",
    "tokens_per_forward",
    "accepted_per_round",
    "tokens_per_second",
    "first_token_seconds",
}


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@pytest.fixture(scope="module")
def worker():
    worker = Worker(lambda: mlx_lm.load(str(TRAINED)), max_batch=8).start()
    yield worker
    worker.close()


def serve(worker, **config):
    config = ServerConfig("dhara_tiny_trained", max_tokens=64, max_context=2048, **config)
    return background_server(create_app(worker, config))


@pytest.fixture(scope="module")
def server(worker):
    with serve(worker) as url:
        yield url


@pytest.fixture(scope="module")
def keyed(worker):
    """A second app on the same worker, with an API key."""
    with serve(worker, api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the browser tests need playwright: pip install playwright"
    )
    path = chromium()
    if path is None:
        pytest.skip("the browser tests need a system Chromium: apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page; ``page.console_errors`` collects console errors and uncaught exceptions."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda error: page.console_errors.append(str(error)))
    page.set_default_timeout(30_000)
    yield page
    context.close()


@pytest.fixture
def slow_steps(monkeypatch):
    """Every batch step takes 20 ms longer, so a long answer is still running when stopped."""
    step = engine_module.Engine.step

    def slow(engine):
        time.sleep(0.02)
        return step(engine)

    monkeypatch.setattr(engine_module.Engine, "step", slow)


def open_page(page, url: str, **settings: str):
    """Load the playground and fill in settings (input ids: temperature, block_len, ...)."""
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    for field, value in settings.items():
        page.fill(f"#{field}", value)


def sel(name: str) -> str:
    return f"[data-testid={name}]"


def running(url: str) -> int:
    return httpx.get(f"{url}/health").json()["running"]


def sse_events(url: str, path: str, body: dict, headers: dict | None = None) -> list[dict]:
    """The JSON events of a streamed request, [DONE] left out."""
    with httpx.stream("POST", f"{url}{path}", json=body, headers=headers, timeout=60) as reply:
        assert reply.status_code == 200, reply.read()
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def text_of(event: dict) -> str:
    choice = event["choices"][0] if event["choices"] else {}
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


# ---- the dhara streaming extension ----------------------------------------------


def test_blocks_stream_every_diffusion_step(server):
    request = dict(
        prompt=CODE, mode="diffusion", max_tokens=24, block_len=8, threshold=0.9, stream=True
    )
    plain = sse_events(server, "/v1/completions", request)
    events = sse_events(
        server, "/v1/completions", {**request, "dhara_stats": True, "dhara_blocks": True}
    )
    assert all("dhara" not in event for event in plain)
    assert "".join(map(text_of, events)) == "".join(map(text_of, plain))  # nothing else changes
    assert all(set(event["dhara"]) - {"block"} == STATS for event in events)
    blocks = [event["dhara"]["block"] for event in events if "block" in event["dhara"]]
    final = events[-1]["dhara"]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and final["generated"] == 24
    assert [block["step"] for block in blocks] == list(range(1, final["rounds"] + 1))
    assert any(not text_of(event) for event in events if "block" in event["dhara"])
    for block in blocks:
        assert set(block) == {"start", "step", "ids", "tokens", "committed"}
        assert len(block["ids"]) == len(block["tokens"]) == len(block["committed"])
        for token_id, token, step in zip(block["ids"], block["tokens"], block["committed"]):
            assert (token_id == MASK) == (token is None) == (step is None)
            assert step is None or step <= block["step"]
    by_start = {}
    for block in blocks:
        by_start.setdefault(block["start"], []).append(block)
    starts = list(by_start)  # whole blocks of block_len, one after the other
    assert len(starts) == 3 and all(b - a == 8 for a, b in zip(starts, starts[1:]))
    assert all(len(block["ids"]) == 8 for block in blocks)
    for steps in by_start.values():  # a block unmasks over several steps, each commits
        assert len(steps) >= 2 and None in steps[0]["tokens"]
        assert len(set(steps[-1]["committed"])) == len(steps)


def test_stats_stream_and_whole_reply(server):
    chat = dict(messages=[{"role": "user", "content": "Write a record class"}], max_tokens=16)
    events = sse_events(
        server,
        "/v1/chat/completions",
        {
            **chat,
            "mode": "spec",
            "stream": True,
            "dhara_stats": True,
            "dhara_blocks": True,  # no blocks outside diffusion
            "stream_options": {"include_usage": True},
        },
    )
    role, *chunks, usage = events
    assert "dhara" not in role and "dhara" not in usage
    assert all(set(event["dhara"]) == STATS for event in chunks)
    final = chunks[-1]["dhara"]
    assert final["mode"] == "spec" and final["generated"] == usage["usage"]["completion_tokens"]
    assert final["forwards"] < final["generated"] and final["accepted_per_round"] > 0
    assert final["first_token_seconds"] > 0 and final["tokens_per_second"] > 0
    whole = httpx.post(
        f"{server}/v1/chat/completions", json={**chat, "mode": "ar", "dhara_stats": True}
    ).json()
    assert whole["dhara"]["mode"] == "ar" and whole["dhara"]["generated"] == 16
    assert whole["dhara"]["tokens_per_forward"] == 1.0

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(
        model="dhara", prompt=CODE, max_tokens=8, stream=True, extra_body={"dhara_stats": True}
    )
    assert all(chunk.model_extra["dhara"]["generated"] >= 1 for chunk in stream)


def test_page_is_open_and_v1_stays_guarded(keyed):
    page = httpx.get(f"{keyed}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("app.js", "style.css"):
        assert httpx.get(f"{keyed}/static/{asset}").status_code == 200
    assert httpx.get(f"{keyed}/static/missing.js").status_code == 404
    config = httpx.get(f"{keyed}/playground.json").json()
    assert config["api_key_required"] is True and config["modes"] == ["ar", "diffusion", "spec"]
    assert httpx.get(f"{keyed}/v1/models").status_code == 401


# ---- the page in Chromium ------------------------------------------------------


def test_page_loads_without_errors(page, server):
    open_page(page, server)
    for name in ("prompt", "send", "compare", "stop", "diffusion-block", "model"):
        assert page.locator(sel(name)).count() == 1
    for mode in ("ar", "diffusion", "spec"):
        assert page.locator(sel(f"output-{mode}")).count() == 1
        assert page.locator(sel(f"stats-{mode}")).count() == 1
    assert page.inner_text(sel("model")) == "dhara_tiny_trained"
    assert not page.is_visible(sel("api-key"))  # this server needs no key
    assert page.is_disabled(sel("stop"))
    theme = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.click(sel("theme"))
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != theme
    page.reload()  # the choice is kept
    page.wait_for_selector("body[data-ready]")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != theme
    assert page.console_errors == []


def test_compare_streams_three_modes(page, server):
    open_page(page, server, temperature="0", max_tokens="40", block_len="8", threshold="0.9")
    page.fill(sel("prompt"), "Write a record class")
    page.click(sel("compare"))
    page.wait_for_function("document.querySelectorAll('.pane[data-state=done]').length === 3")
    text = {mode: page.inner_text(sel(f"output-{mode}")) for mode in ("ar", "diffusion", "spec")}
    assert all(text.values())
    assert text["ar"] == text["spec"]  # greedy self-speculation is AR
    stats = {
        mode: page.eval_on_selector(sel(f"stats-{mode}"), "element => ({...element.dataset})")
        for mode in text
    }
    for mode, values in stats.items():
        assert values["mode"] == mode and 0 < int(values["generated"]) <= 40, values
        assert float(values["tokens_per_second"]) > 0 and float(values["first_token_seconds"]) > 0
    assert stats["ar"]["generated"] == stats["spec"]["generated"]
    assert float(stats["ar"]["tokens_per_forward"]) == 1.0
    assert float(stats["spec"]["tokens_per_forward"]) > 1.0
    assert float(stats["spec"]["accepted_per_round"]) > 0
    shown = page.inner_text(sel("stats-spec"))
    for label in ("tok/s", "tok/forward", "accepted/round", "first token"):
        assert label in shown
    # each block was unmasked over several steps: its slots carry distinct step numbers
    strips = page.eval_on_selector_all(
        f"{sel('diffusion-block')} .strip",
        "strips => strips.map(s => ({steps: +s.dataset.steps, "
        "slots: [...s.querySelectorAll('.slot')].map(x => x.dataset.step)}))",
    )
    assert strips and max(strip["steps"] for strip in strips) >= 2
    assert any(len({step for step in strip["slots"] if step}) >= 2 for strip in strips)
    page.click(sel("replay"))  # the steps again, slowly: the MASK slots fill in
    page.wait_for_selector(f"{sel('diffusion-block')} .slot.masked")
    assert page.console_errors == []


def test_chat_keeps_history_and_keyboard_submits(page, server):
    open_page(page, server, max_tokens="12")
    page.select_option(sel("mode"), "spec")
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if "/v1/chat" in r.url else None)
    page.fill(sel("prompt"), "Write a record class")
    page.press(sel("prompt"), "Shift+Enter")  # a new line, not a send
    assert sent == [] and page.input_value(sel("prompt")) == "Write a record class\n"
    page.press(sel("prompt"), "Enter")
    page.wait_for_selector(".message.assistant[data-state=done]")
    first = page.inner_text(".message.assistant .body")
    page.fill(sel("prompt"), "And another")
    page.press(sel("prompt"), "Control+Enter")
    page.wait_for_function(
        "document.querySelectorAll('.message.assistant[data-state=done]').length === 2"
    )
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
    assert sent[1]["messages"][1]["content"] == first
    assert sent[1]["mode"] == "spec" and sent[1]["max_tokens"] == 12
    assert page.console_errors == []


def test_stop_cancels_the_request(page, server, slow_steps):
    open_page(page, server, max_tokens="1500")
    page.uncheck(sel("chat-template"))
    page.select_option(sel("mode"), "ar")
    page.fill(sel("prompt"), CODE)
    page.click(sel("send"))
    body = ".message.assistant .body"
    page.wait_for_function(f"document.querySelector('{body}').textContent.length > 20")
    assert running(server) == 1
    page.click(sel("stop"))
    page.wait_for_selector(".message.assistant[data-state=stopped]")
    length = len(page.text_content(body))
    deadline = time.monotonic() + 5
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(server) == 0
    time.sleep(0.3)
    assert len(page.text_content(body)) == length  # nothing arrives after the stop
    assert page.is_enabled(sel("send")) and page.is_disabled(sel("stop"))
    assert page.console_errors == []


def test_api_key_is_asked_for(page, keyed):
    open_page(page, keyed, max_tokens="8")
    assert page.is_visible(sel("api-key"))
    page.fill(sel("prompt"), "Write a record class")
    page.click(sel("send"))
    page.wait_for_function("document.querySelector('[data-testid=error]').textContent !== ''")
    assert "API key" in page.inner_text(sel("error"))
    assert page.locator(".message").count() == 0  # the failed turn is taken back
    assert page.input_value(sel("prompt")) == "Write a record class"  # to send again
    page.fill(sel("api-key"), KEY)
    page.click(sel("send"))
    page.wait_for_selector(".message.assistant[data-state=done]")
    assert page.inner_text(sel("error")) == ""
    assert page.inner_text(".message.assistant .body")
