"""The OpenAI-compatible API, driven by the official ``openai`` client: a real ``bloombee api`` process
in front of the session's SmolLM2 swarm (three servers), compared with local transformers."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bloombee_core.stack import Child

KEY = "test-key-123"
NAME = "smollm2"
QUESTION = "What is a distributed hash table?"


@pytest.fixture(scope="module")
def api(swarm, smollm2, smollm2_servers) -> str:
    child = Child(
        "api-smollm2",
        ["bloombee_core.cli", "api", str(smollm2), "--initial-peers", *swarm.peers]
        + ["--port", "0", "--name", NAME, "--api-key", KEY, "--max-concurrent", "4"],
        swarm.log_dir,
    )
    try:
        yield child.wait_ready()["url"]
    finally:
        child.stop()


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()

    def greedy(ids: list[int], new: int) -> tuple[list[int], str]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False)
        tokens = out[0, len(ids) :].tolist()
        return tokens, tokenizer.decode(tokens, skip_special_tokens=True)

    def chat_ids(text: str) -> list[int]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def logprobs(ids: list[int], tokens: list[int]) -> list[float]:
        with torch.no_grad():
            logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()

    return type(
        "Local",
        (),
        {
            "greedy": staticmethod(greedy),
            "chat_ids": staticmethod(chat_ids),
            "tokenizer": tokenizer,
            "logprobs": staticmethod(logprobs),
        },
    )


def chat(client, text=QUESTION, **kwargs):
    return client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": text}], **{"temperature": 0, **kwargs}
    )


def streamed(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_and_the_api_key(api, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=f"{api}/v1", api_key="wrong", max_retries=0).models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


def test_chat_greedy_equals_transformers_streamed_or_not(client, local):
    ids = local.chat_ids(QUESTION)
    tokens, want = local.greedy(ids, 20)
    reply = chat(client, max_tokens=20)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 20)
    assert [hop["blocks"] for hop in reply.route] == [[0, 7], [7, 20], [20, 30]]  # the three servers

    text, chunks = streamed(chat(client, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 5  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_completion_greedy_with_logprobs(client, local):
    prompt = "The capital of France is"
    ids = local.tokenizer(prompt)["input_ids"]
    tokens, want = local.greedy(ids, 8)
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == want
    assert reply.usage.prompt_tokens == len(ids)
    assert "".join(choice.logprobs.tokens) == want
    torch.testing.assert_close(choice.logprobs.token_logprobs, local.logprobs(ids, tokens), atol=1e-4, rtol=0)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    # the chosen token is the most likely one
    assert all(
        max(top.values()) == lp
        for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs, strict=True)
    )

    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want


def test_stop_strings_end_the_reply_and_never_show(client, local):
    _, want = local.greedy(local.chat_ids(QUESTION), 24)
    words = want.split(" ")
    stop = " " + words[4][:3]  # a stop string in the middle of the reference reply
    cut = want.index(stop)
    for stream in (False, True):
        reply = chat(client, max_tokens=24, stop=["never-there", stop], stream=stream)
        if stream:
            text, chunks = streamed(reply)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert (text, finish) == (want[:cut], "stop")


def test_sampling_is_seeded_and_top_p_narrows_it(client, local):
    first = chat(client, max_tokens=12, temperature=1.0, seed=7).choices[0].message.content
    again = chat(client, max_tokens=12, temperature=1.0, seed=7).choices[0].message.content
    assert first == again
    # a nucleus this small holds only the most likely token: sampling becomes greedy
    _, want = local.greedy(local.chat_ids(QUESTION), 12)
    assert chat(client, max_tokens=12, temperature=1.0, top_p=1e-6).choices[0].message.content == want


def test_concurrent_streams_run_at_once(client, local):
    questions = ["Name a prime number.", "What is Python?", "Why is the sky blue?"]
    results: dict[int, tuple[str, float, float]] = {}

    def one(i: int) -> None:
        first = None
        parts = []
        for chunk in chat(client, questions[i], max_tokens=16, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else time.monotonic()
                parts.append(chunk.choices[0].delta.content)
        results[i] = ("".join(parts), first, time.monotonic())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == [0, 1, 2]
    for i, question in enumerate(questions):
        assert results[i][0] == local.greedy(local.chat_ids(question), 16)[1]
    # not a queue of one: every stream had its first token before any stream ended
    assert max(r[1] for r in results.values()) < min(r[2] for r in results.values())


def post(url: str, body: bytes) -> tuple[int, dict]:
    """A raw POST (what no OpenAI client would send): status and JSON body."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def sessions_on(raw_client, peers: list[str]) -> list[int]:
    from bloombee_core.client.rpc import call
    from bloombee_core.compression import RAW
    from bloombee_core.swarm import wire

    loop, transport = raw_client
    heads = [
        loop.run(
            call(transport, p, {"type": "info"}, None, RAW, wire.compressor_table(None), 10.0), timeout=30
        )[0]
        for p in peers
    ]
    return [head["sessions"] for head in heads]


def test_a_client_leaving_mid_stream_frees_the_servers_caches(client, smollm2_servers, raw_client):
    peers = [child.ready["peer"] for child in smollm2_servers]
    assert sessions_on(raw_client, peers) == [0, 0, 0]
    with chat(client, max_tokens=400, stream=True) as stream:
        for count, _ in enumerate(stream):
            if count == 3:
                break
        assert max(sessions_on(raw_client, peers)) >= 1  # the generation holds its caches now
    wait_until_free(raw_client, peers)
    # a caller of a non-streamed answer that gives up (here: its timeout) ends the generation too
    impatient = client.with_options(timeout=2.0)
    with pytest.raises(openai.APITimeoutError):
        chat(impatient, max_tokens=400)
    wait_until_free(raw_client, peers)


def wait_until_free(raw_client, peers: list[str]) -> None:
    deadline = time.monotonic() + 30
    while (left := sessions_on(raw_client, peers)) != [0, 0, 0] and time.monotonic() < deadline:
        time.sleep(0.25)
    assert left == [0, 0, 0]


def test_errors_come_in_the_openai_format(api, client, local):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "word " * 9000, max_tokens=4)
    assert caught.value.code == "context_length_exceeded" and "8192" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, max_tokens=4, n=2)
    assert caught.value.param == "n"
    for body, param in ((b"{not json", None), (b'{"model": "smollm2"}', "messages"), (b"[1]", None)):
        status, reply = post(f"{api}/v1/chat/completions", body)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error", reply
        assert reply["error"]["param"] == param and reply["error"]["message"]
    status, reply = post(f"{api}/v1/completions", json.dumps({"model": NAME, "prompt": [10**9]}).encode())
    assert status == 400 and reply["error"]["param"] == "prompt"
    # the API still serves after all of that
    assert (
        chat(client, max_tokens=3).choices[0].message.content == local.greedy(local.chat_ids(QUESTION), 3)[1]
    )


def chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver (``nox -s tests`` installs them where it can)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail(
            "the chat-page test needs a real headless browser: install Debian's packages "
            "'chromium' and 'chromium-driver' (apt-get install chromium chromium-driver)"
        )
    return browser, driver


def test_the_chat_page_streams_a_reply_in_a_real_browser(api):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    page = urllib.request.urlopen(f"{api}/", timeout=30).read().decode()
    assert "<script src" not in page and 'href="http' not in page  # self-contained: nothing to fetch

    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to download a browser or driver
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(f"{api}/")
        wait.until(lambda d: "API key" in d.find_element(By.ID, "model").text)  # 401 shown: no key yet
        driver.find_element(By.ID, "key").send_keys(KEY, Keys.TAB)  # change event: models load again
        wait.until(lambda d: d.find_element(By.ID, "model").text == NAME)
        driver.find_element(By.ID, "input").send_keys("Say hello in one sentence.", Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant + .meta"))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant + .meta").text)
        answer = driver.find_element(By.CSS_SELECTOR, ".message.assistant").text
        meta = driver.find_element(By.CSS_SELECTOR, ".message.assistant + .meta").text
        assert answer.strip(), "no streamed answer"
        assert "tokens/s" in meta and "first token after" in meta, meta
        assert (
            "0:7" in driver.find_element(By.ID, "route").text
            and "20:30" in driver.find_element(By.ID, "route").text
        )
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        # the one expected error: the 401 of the first /v1/models call, before the key was typed
        unexpected = [e for e in errors if "401" not in e["message"]]
        assert not unexpected, unexpected
    finally:
        driver.quit()


def test_speculative_decoding_is_the_servers_setting(swarm, smollm2, smollm2_servers, local):
    drafter = '{"name": "speculative", "drafter": "prompt-lookup"}'
    child = Child(
        "api-speculative",
        ["bloombee_core.cli", "api", str(smollm2), "--initial-peers", *swarm.peers]
        + ["--port", "0", "--name", NAME, "--decoding", drafter],
        swarm.log_dir,
    )
    try:
        url = child.wait_ready()["url"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        questions = [QUESTION, "Repeat after me: one two three, one two three, one two three."]
        replies: dict[int, object] = {}

        def one(i: int) -> None:
            replies[i] = chat(client, questions[i], max_tokens=20)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]  # two at once: two drafters
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        for i, question in enumerate(questions):
            reply = replies[i]
            assert reply.choices[0].message.content == local.greedy(local.chat_ids(question), 20)[1]
            assert reply.decoding["name"] == "speculative", reply.decoding
        repeated = replies[1].decoding
        assert repeated["rounds"] < repeated["tokens"], repeated  # drafts of the repeated phrase accepted
        sampled = chat(client, max_tokens=4, temperature=0.7, seed=1)
        assert sampled.decoding == {"name": "sampling"}
    finally:
        child.stop()
