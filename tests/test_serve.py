"""The HTTP server against real clients: the official `openai` client, raw HTTP, a headless
browser, and a server process that is sent SIGTERM. One in-process server (a real uvicorn on
127.0.0.1 and a free port) over a tiny random-weight model is shared by the tests."""

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
import uvicorn
from conftest import ROOT, tiny_config
from flax import nnx

from charlm_jax.data.tokenizers import CharTokenizer
from charlm_jax.decoding.engine import Engine
from charlm_jax.errors import UserError
from charlm_jax.model import models
from charlm_jax.server.app import server_config
from charlm_jax.server.cache import OutputCache
from charlm_jax.server.service import ServeOptions, Service
from charlm_jax.workdir import checkpoints

TEXT = "ROMEO: to be or not to be\nJULIET: that is the question\n"
NUM_SLOTS = 4
LONG = 50_000  # tokens: a request that lasts until it is stopped


def random_workdir(path):
    """A workdir holding a tiny Transformer with random weights (checkpoint step 1)."""
    config = tiny_config(**{"data.context_length": 16})  # fewer prefill shapes to compile
    tokenizer = CharTokenizer.from_text(TEXT)
    model = models.create_model(config, tokenizer.vocab_size, nnx.Rngs(0))
    with checkpoints.open_manager(path) as manager:
        checkpoints.save(manager, 1, nnx.state(model), nnx.state(model), val_loss=1.0)
    checkpoints.save_run_files(path, config, tokenizer)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return random_workdir(tmp_path_factory.mktemp("serve") / "tiny")


class ServerProcess:
    """`python -m charlm_jax.serve` in a subprocess, on a free port."""

    def __init__(self, workdir, env, *flags):
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "charlm_jax.serve",
                f"--workdir={workdir}",
                "--port=0",
                f"--num_slots={NUM_SLOTS}",
                *flags,
            ],
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **env},
        )
        self.log: list[str] = []
        self.port = None
        started = threading.Event()

        def read():
            for line in self.process.stderr:
                self.log.append(line)
                if found := re.search(r"running on http://127.0.0.1:(\d+)", line):
                    self.port = int(found.group(1))
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        self.started = started

    def url(self, path=""):
        assert self.started.wait(120) and self.port, "".join(self.log)
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache shared with the server subprocess: it then loads the
    in-process server's compiled engine instead of compiling it again."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = [getattr(jax.config, name) for name in names]
    path = tmp_path_factory.mktemp("jax_cache")
    for name, value in zip(names, (str(path), 0.0), strict=True):
        jax.config.update(name, value)
    yield {name.upper(): str(value) for name, value in zip(names, (path, 0.0), strict=True)}
    for name, value in zip(names, saved, strict=True):
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def server_process(workdir, server, compilation_cache):
    process = ServerProcess(
        workdir, compilation_cache, "--grace_period=20", f"--max_tokens_limit={LONG}"
    )
    yield process
    if process.process.poll() is None:
        process.process.kill()


class LiveServer:
    """A uvicorn server in a thread over `service`, with `serve.py`'s connection limits
    (`server_config`'s keyword arguments: `max_connections`, `header_timeout`)."""

    def __init__(self, service: Service, **limits):
        self.service = service
        config = server_config(service, "127.0.0.1", 0, log_level="warning", **limits)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not (self.server.started and service.status in ("ready", "failed")):
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(workdir, compilation_cache):
    options = ServeOptions(
        max_tokens_limit=LONG * 2, max_request_tokens=LONG * 2, max_queued_tokens=LONG * 8
    )
    live = LiveServer(Service.from_workdir(workdir, num_slots=NUM_SLOTS, options=options))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


@contextlib.contextmanager
def options(service: Service, **changes):
    """The service's options changed for the duration (the scheduler's bounds included)."""
    saved, scheduler = service.options, service.scheduler
    saved_bounds = scheduler.max_queue, scheduler.max_tokens, scheduler.step_timeout
    service.options = new = dataclasses.replace(saved, **changes)
    scheduler.max_queue, scheduler.max_tokens = new.max_queue, new.max_queued_tokens
    scheduler.step_timeout = new.step_timeout
    try:
        yield
    finally:
        service.options = saved
        scheduler.max_queue, scheduler.max_tokens, scheduler.step_timeout = saved_bounds


def metric(server, name, labels=""):
    """The value of a metric (a sample line `name{labels} value`) in /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_models_health_ready(server, client, server_process):
    # (server_process is asked for here so that it boots while the other tests run)
    assert [m.id for m in client.models.list().data] == ["tiny:1"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_completion(client):
    out = client.completions.create(model="tiny:1", prompt="ROMEO:", max_tokens=20, seed=3)
    [choice] = out.choices
    assert out.model == "tiny:1" and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 20
    assert len(choice.text) == 20 and set(choice.text) <= set(TEXT)
    default = client.completions.create(model="tiny", prompt="ROMEO:")
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens


def test_streaming_matches_whole(client):
    whole = client.completions.create(model="tiny:1", prompt="JULIET:", max_tokens=40, seed=5)
    chunks = list(
        client.completions.create(
            model="tiny:1",
            prompt=["JULIET:", "ROMEO:"],  # not the cached request above
            max_tokens=40,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == 0]
    assert len(first) > 1  # streamed in pieces
    assert "".join(c.text for c in first) == whole.choices[0].text
    assert first[-1].finish_reason == "length" and first[0].finish_reason is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 80


def test_n_prompt_list_and_seeds(client):
    out = client.completions.create(
        model="tiny:1", prompt=["ROMEO:", "JULIET:"], n=3, max_tokens=12, temperature=1.0, seed=7
    )
    assert [c.index for c in out.choices] == list(range(6))
    texts = [c.text for c in out.choices]
    assert len(set(texts[:3])) == 3  # the n choices differ
    alone = client.completions.create(model="tiny:1", prompt="JULIET:", max_tokens=12, seed=7)
    assert texts[3] == alone.choices[0].text  # choice 0 uses the request's seed
    other = client.completions.create(model="tiny:1", prompt="JULIET:", max_tokens=12, seed=8)
    assert other.choices[0].text != alone.choices[0].text
    assert out.usage.prompt_tokens == 6 + 7 and out.usage.completion_tokens == 6 * 12


def test_stop_strings(client):
    prompt = "to be or"
    greedy = (
        client.completions.create(model="tiny:1", prompt=prompt, max_tokens=60, temperature=0)
        .choices[0]
        .text
    )
    stop = greedy[25:28]
    expected = greedy[: greedy.index(stop)]
    for stream in (False, True):
        out = client.completions.create(
            model="tiny:1",
            prompt=prompt,
            max_tokens=60,
            temperature=0,
            stop=["@@", stop],
            stream=stream,
        )
        choices = [c.choices[0] for c in out] if stream else out.choices
        assert "".join(c.text for c in choices) == expected
        assert choices[-1].finish_reason == "stop"


def test_echo_and_logprobs(client):
    out = client.completions.create(
        model="tiny:1", prompt="ROMEO:", max_tokens=5, echo=True, temperature=0
    )
    assert out.choices[0].text.startswith("ROMEO:") and len(out.choices[0].text) == 11
    out = client.completions.create(
        model="tiny:1", prompt="ROMEO:", max_tokens=5, logprobs=3, temperature=0
    )
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and lp.text_offset == [0, 1, 2, 3, 4]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5) and top[token] == max(
            top.values()
        )  # greedy picks the most likely


def test_reproducible_among_60_others(server, client):
    request = dict(model="tiny:1", prompt="ROMEO: to", max_tokens=24, temperature=0.9, seed=11)
    alone = client.completions.create(**request).choices[0].text

    def other(i):
        return client.completions.create(
            model="tiny:1",
            prompt=TEXT[i % 20 :],  # longer than the context: its last 16 tokens
            max_tokens=10 + i,
            temperature=1.0,
            seed=i,
            stream=i % 2 == 0,
            extra_body={"truncate_prompt_tokens": 16},
        )

    with concurrent.futures.ThreadPoolExecutor(61) as pool:
        others = [pool.submit(other, i) for i in range(60)]
        mine = pool.submit(lambda: client.completions.create(**request))
        for f in others:
            result = f.result()
            if not isinstance(result, openai.types.Completion):
                list(result)  # read the stream to the end
        assert mine.result().choices[0].text == alone


def test_queue_full_gets_429(server, client):
    def long_stream():
        return client.completions.create(model="tiny:1", prompt="R", max_tokens=LONG, stream=True)

    streams = []
    try:
        streams += [long_stream() for _ in range(NUM_SLOTS)]
        wait_until(lambda: metric(server, "charlm_requests_running") == NUM_SLOTS)
        with options(server.service, max_queue=1):
            streams.append(long_stream())  # waits for a slot
            with pytest.raises(openai.RateLimitError) as error:
                client.completions.create(model="tiny:1", prompt="R", max_tokens=5)
        assert error.value.response.headers["Retry-After"] == "1"
        assert error.value.body["type"] == "rate_limit_error"
        assert metric(server, "charlm_requests_waiting") == 1
    finally:
        for stream in streams:
            stream.close()
    wait_until(lambda: server.service.scheduler.idle)


def test_disconnect_frees_slot(server, client):
    service = server.service
    stream = client.completions.create(model="tiny:1", prompt="R", max_tokens=LONG, stream=True)
    next(iter(stream))
    stream.close()  # an early close
    wait_until(lambda: service.scheduler.idle)
    with httpx.Client() as http, pytest.raises(httpx.ReadTimeout):  # a client that gives up
        http.post(
            f"{server.url}/v1/completions", json={"prompt": "R", "max_tokens": LONG}, timeout=0.5
        )
    wait_until(lambda: service.scheduler.idle)
    tokens = metric(server, "charlm_generated_tokens_total")
    time.sleep(0.3)
    assert metric(server, "charlm_generated_tokens_total") == tokens  # nothing is decoding


def test_request_timeout(server, client):
    with options(server.service, request_timeout=0.3):
        with pytest.raises(openai.APIStatusError) as error:
            client.completions.create(model="tiny:1", prompt="R", max_tokens=LONG)
        assert error.value.status_code == 504 and error.value.body["type"] == "timeout_error"
        with pytest.raises(openai.APIError, match="request_timeout"):
            list(
                client.completions.create(model="tiny:1", prompt="R", max_tokens=LONG, stream=True)
            )
    wait_until(lambda: server.service.scheduler.idle)


def test_one_log_line_per_request(server, client, caplog):
    caplog.set_level(logging.INFO)
    ids = []
    for log_prompts in (False, True):
        with options(server.service, log_prompts=log_prompts):
            ids.append(
                client.completions.create(model="tiny:1", prompt="ROMEO:", max_tokens=3, seed=1).id
            )
    # Only this test's requests: one of an earlier test, which timed out, may log in between.
    messages = [r.getMessage().split(" ", 2) for r in caplog.records]
    first, second = [" ".join(m) for m in messages if m[0] == "request" and m[1] in ids]
    assert re.fullmatch(
        r"request cmpl-\w+ status=200 prompt_tokens=6 completion_tokens=3 "
        r"latency=[\d.]+s",
        first,
    )
    assert second.endswith("cached prompt=['ROMEO:']")


def test_metrics_move(server, client):
    before = {
        name: metric(server, name)
        for name in (
            "charlm_generated_tokens_total",
            "charlm_time_to_first_token_seconds_count",
            "charlm_request_latency_seconds_count",
            "charlm_prompt_tokens_total",
        )
    }
    ok = metric(server, "charlm_requests_total", '{status="200"}')
    client.completions.create(model="tiny:1", prompt="ROMEO:", max_tokens=30)
    after = {name: metric(server, name) for name in before}
    assert after["charlm_generated_tokens_total"] - before["charlm_generated_tokens_total"] == 30
    assert after["charlm_prompt_tokens_total"] - before["charlm_prompt_tokens_total"] == 6
    for name in (
        "charlm_time_to_first_token_seconds_count",
        "charlm_request_latency_seconds_count",
    ):
        assert after[name] == before[name] + 1
    assert metric(server, "charlm_requests_total", '{status="200"}') == ok + 1
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "charlm_requests_running",
        "charlm_requests_waiting",
        "charlm_slot_occupancy",
        "charlm_inter_token_latency_seconds_bucket",
        "charlm_slots",
    ):
        assert name in text


def test_output_cache(server, client):
    hits, misses = (metric(server, f"charlm_output_cache_{x}_total") for x in ("hits", "misses"))
    request = dict(
        model="tiny:1", prompt="JULIET: th", max_tokens=30, temperature=0.7, seed=9, logprobs=2
    )
    first = client.completions.create(**request)
    second = client.completions.create(**request)
    replay = list(client.completions.create(**request, stream=True))
    assert metric(server, "charlm_output_cache_misses_total") == misses + 1
    assert metric(server, "charlm_output_cache_hits_total") == hits + 2
    assert second.choices == first.choices and second.id != first.id
    assert "".join(c.choices[0].text for c in replay) == first.choices[0].text
    client.completions.create(**{**request, "seed": 10})  # another key: a miss
    client.completions.create(**{**request, "seed": None})  # not deterministic: neither
    assert metric(server, "charlm_output_cache_misses_total") == misses + 2
    assert metric(server, "charlm_output_cache_hits_total") == hits + 2


def test_output_cache_bounds():
    cache = OutputCache(max_entries=2, max_bytes=100)
    cache.put("a", {"text": "x"})
    cache.put("b", {"text": "y"})
    assert cache.get("a") == {"text": "x"}  # now the most recently used
    cache.put("c", {"text": "z"})  # a third entry: the least recently used goes
    assert cache.get("b") is None and cache.get("a") and cache.get("c") and len(cache) == 2
    cache.put("d", {"text": "w" * 80})  # over 100 bytes with another entry
    assert len(cache) == 1 and cache.bytes <= 100 and cache.get("d")
    cache.put("e", {"text": "v" * 200})  # larger than the whole cache: not kept
    assert cache.get("e") is None and cache.get("d")


BAD_REQUESTS = [
    ({"prompt": "ROMEO€"}, "prompt", "'€'"),
    ({"prompt": "R", "temperature": -1}, "temperature", "temperature"),
    ({"prompt": "R", "top_p": 0}, "top_p", "top_p"),
    ({"prompt": "R", "top_p": 1.5}, "top_p", "top_p"),
    ({"prompt": "R", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"prompt": "R", "max_tokens": 10**6}, "max_tokens", "100000"),
    ({"prompt": "R", "n": 17}, "n", "16"),
    ({"prompt": "R", "logprobs": 6}, "logprobs", "5"),
    ({"prompt": "R", "stop": ["a", "b", "c", "d", "e"]}, "stop", "4"),
    ({"prompt": "R", "max_tokens": "4"}, "max_tokens", "integer"),
    ({"prompt": 3}, "prompt", "string"),
    ({"max_tokens": 3}, "prompt", "required"),
    ({"prompt": "R", "top_k": -1}, "top_k", "top_k"),
    ({"prompt": "R", "frequency_penalty": 1}, "frequency_penalty", "not supported"),
    ({"prompt": "R", "colour": "red"}, "colour", "xtra"),
]


def test_bad_requests(server, client):
    url = f"{server.url}/v1/completions"
    for body, param, text in BAD_REQUESTS:
        response = httpx.post(url, json=body)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param, (body, error)
        assert text in error["message"] and error["type"] == "invalid_request_error"
    response = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="R")
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["message"].endswith("Not Found")
    assert client.completions.create(model="tiny:1", prompt="R", max_tokens=3).choices


def test_playground_in_a_browser(server):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chrome = webdriver.ChromeOptions()
    chrome.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        chrome.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=chrome, service=service)
    try:
        driver.get(server.url)
        driver.execute_script(  # counts the changes to the output as they come
            "window.updates = 0; new MutationObserver(() => window.updates++).observe("
            "document.getElementById('output'), {subtree: true, childList: true});"
        )
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("JULIET:")
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("300")
        driver.find_element(By.ID, "generate").click()
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "300 tokens" in d.find_element(By.ID, "stats").text)
        assert "tokens/s" in driver.find_element(By.ID, "stats").text
        assert len(driver.find_element(By.ID, "completion").text.replace("\n", "")) > 200
        assert driver.execute_script("return window.updates") > 3  # streamed in pieces
    finally:
        driver.quit()


def test_sigterm_drains_then_exits_0(server_process):
    url = server_process.url
    wait_until(lambda: _status(url("/ready")) == 200, timeout=120)
    body = {"prompt": "R", "max_tokens": LONG // 10, "stream": True}  # a few seconds
    with httpx.stream("POST", url("/v1/completions"), json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        server_process.process.send_signal(signal.SIGTERM)
        wait_until(lambda: _status(url("/ready")) == 503)
        refused = httpx.post(url("/v1/completions"), json={"prompt": "R"})
        assert refused.status_code == 503
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"  # the running request finished
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in rest[:-1])
    assert len(text) > 0
    assert server_process.process.wait(30) == 0, "".join(server_process.log)
    log = "".join(server_process.log)
    assert re.search(
        rf"request cmpl-\w+ status=200 prompt_tokens=1 completion_tokens={LONG // 10} "
        r"latency=[\d.]+s\n",
        log,
    )


def _status(url):
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def test_workdir_checkpoint_and_quantization(workdir, tmp_path):
    with pytest.raises(UserError, match="no checkpoints in"):
        Service.from_workdir(tmp_path)
    with pytest.raises(ValueError, match="unknown quantization mode 'int4'"):
        Service.from_workdir(workdir, quantize="int4")
    service = Service.from_workdir(workdir, "latest", num_slots=NUM_SLOTS, quantize="int8")
    assert service.info.id == "tiny:1:int8"
    # Below int8.MIN_ROWS slots the engine starts on the float32 copy (its warm-up measures).
    assert not any(x.dtype == np.int8 for x in jax.tree.leaves(service.scheduler.engine.weights))
    assert service.decode_dots == "float32"


def test_int8_server_decodes_through_int8(workdir, monkeypatch):
    # Without the warm-up only the shapes this request needs compile (seconds, not a minute).
    monkeypatch.setattr(Engine, "warm_up", lambda self: None)
    service = Service.from_workdir(workdir, num_slots=8, quantize="int8")
    weights = jax.tree.leaves(service.scheduler.engine.weights)
    assert any(x.dtype == np.int8 for x in weights)  # the int8 model itself, not a float32 copy
    live = LiveServer(service)
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        out = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8)
        assert out.model == "tiny:1:int8" and out.usage.completion_tokens == 8
        listed = httpx.get(f"{live.url}/v1/models").json()["data"][0]
        assert listed["decode_dots"] == "int8"
    finally:
        live.stop()
