"""Prompt scoring through /v1/completions (echo with logprobs), as evaluation harnesses ask
for it: the numbers equal the offline scorer's (`model.scoring`), over texts longer than
the context; OpenAI's shapes; the length policy; admission; off the event loop."""

import concurrent.futures
import math
import threading
import time

import httpx
import jax
import numpy as np
import pytest
from test_serve import TEXT, LiveServer, options, random_workdir

from charlm_jax.decoding.engine import Engine
from charlm_jax.model import scoring
from charlm_jax.server.service import ServeOptions, Service
from charlm_jax.workdir.loader import open_run

CONTEXT = 16  # random_workdir's: TEXT is longer, so it is scored in sliding windows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return random_workdir(tmp_path_factory.mktemp("scoring") / "tiny")


@pytest.fixture(scope="module")
def server(workdir):
    # Without the warm-up only the shapes these requests need compile.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "warm_up", lambda self: None)
        service = Service.from_workdir(workdir, num_slots=2, options=ServeOptions())
        live = LiveServer(service)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def run(workdir):
    return open_run(workdir)


def complete(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def offline(run, text, k=3):
    """The offline evaluation of `text`: the project's scorer, its default stride."""
    ids = run.tokenizer.encode(text)
    return scoring.score_tokens(run.model, ids, run.context_length, top_k=k)


@pytest.mark.parametrize("as_ids", [False, True])
def test_prompt_logprobs_equal_the_offline_scorer(server, run, as_ids):
    assert len(TEXT) > 3 * CONTEXT == 3 * run.context_length
    prompt = run.tokenizer.encode(TEXT).tolist() if as_ids else TEXT
    out = complete(server, prompt=prompt, echo=True, logprobs=3, max_tokens=0)
    [choice] = out.json()["choices"]
    lp, expected = choice["logprobs"], offline(run, TEXT)
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert lp["tokens"] == list(TEXT) and lp["text_offset"] == list(range(len(TEXT)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], expected.log_probs, atol=1e-5)
    bits_per_char = -sum(lp["token_logprobs"][1:]) / math.log(2) / (len(TEXT) - 1)
    assert bits_per_char == pytest.approx(expected.bits_per_char, abs=1e-4)
    text = run.tokenizer.decode
    for j, (token, logprob, top) in enumerate(
        zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True)
    ):
        assert list(top) == [text([i]) for i in expected.top_ids[j]]  # likeliest first
        assert len(top) == 3 and max(top.values()) >= logprob
        assert top.get(token, logprob) == pytest.approx(logprob, abs=1e-6)
    assert out.json()["usage"] == {
        "prompt_tokens": len(TEXT),
        "completion_tokens": 0,
        "total_tokens": len(TEXT),
    }


def test_generation_follows_the_prompt_entries(server, run):
    prompt = TEXT[:CONTEXT]
    scored = complete(server, prompt=prompt, echo=True, logprobs=2, max_tokens=0).json()
    out = complete(server, prompt=prompt, echo=True, logprobs=2, max_tokens=5, temperature=0).json()
    lp, head = out["choices"][0]["logprobs"], scored["choices"][0]["logprobs"]
    assert out["choices"][0]["text"][: len(prompt)] == prompt
    assert len(out["choices"][0]["text"]) == len(prompt) + 5
    assert lp["text_offset"] == list(range(len(prompt) + 5))
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    for name, values in head.items():  # the prompt's entries, then the new tokens'
        assert lp[name][: len(prompt)] == values
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])
    without_echo = complete(server, prompt=prompt, logprobs=2, max_tokens=5, temperature=0)
    assert (
        without_echo.json()["choices"][0]["logprobs"]["token_logprobs"]
        == (lp["token_logprobs"][len(prompt) :])
    )


def test_long_prompts_are_scored_whole(server, run):
    # max_tokens 0: no generation, so no context limit; with new tokens, today's policy.
    too_long = complete(server, prompt=TEXT, echo=True, logprobs=0, max_tokens=3)
    assert too_long.status_code == 400 and "truncate_prompt_tokens" in too_long.text
    out = complete(
        server,
        prompt=TEXT,
        echo=True,
        logprobs=0,
        max_tokens=3,
        truncate_prompt_tokens=CONTEXT,
        temperature=0,
    ).json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(TEXT) + 3 and lp["top_logprobs"][1:] == [{}] * (len(TEXT) + 2)
    np.testing.assert_allclose(
        lp["token_logprobs"][1 : len(TEXT)], offline(run, TEXT, 0).log_probs, atol=1e-5
    )
    assert out["usage"]["prompt_tokens"] == CONTEXT  # the tokens the model continued


def test_several_prompts_and_n(server):
    prompts = [TEXT, "ROMEO:", "J"]
    out = complete(server, prompt=prompts, n=2, echo=True, logprobs=1, max_tokens=0).json()
    assert [c["index"] for c in out["choices"]] == list(range(6))
    for c, choice in enumerate(out["choices"]):
        alone = complete(server, prompt=prompts[c // 2], echo=True, logprobs=1, max_tokens=0)
        expected = alone.json()["choices"][0]["logprobs"]
        assert (
            choice["text"] == prompts[c // 2]
            and choice["logprobs"]["tokens"] == (expected["tokens"])
        )
        assert choice["logprobs"]["token_logprobs"][0] is None
        np.testing.assert_allclose(
            choice["logprobs"]["token_logprobs"][1:], expected["token_logprobs"][1:], atol=1e-5
        )
    empty = complete(server, prompt="", echo=True, logprobs=1, max_tokens=0).json()
    assert empty["choices"][0]["logprobs"] == {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }


def test_streaming_sends_the_prompt_logprobs_first(server):
    body = dict(prompt="ROMEO: to be", echo=True, logprobs=2, max_tokens=20, seed=3)
    whole = complete(server, **body).json()["choices"][0]
    # Two prompts (each with the seed): not the cached request above.
    stream = {**body, "prompt": [body["prompt"]] * 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=stream) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [httpx.Response(200, content=e).json()["choices"][0] for e in events[:-1]]
    chunks = [c for c in chunks if c["index"] == 0]
    assert len(chunks) > 2  # the prompt, then the new text in pieces
    assert chunks[0]["text"] == body["prompt"] and chunks[0]["logprobs"]["tokens"] == list(
        body["prompt"]
    )
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for name in whole["logprobs"]:
        streamed = [x for c in chunks for x in c["logprobs"][name]]
        assert streamed == whole["logprobs"][name], name


@pytest.mark.parametrize(
    ("body", "param", "text"),
    [
        ({"logprobs": 6}, "logprobs", "[0, 5]"),
        ({"prompt": [1, 999]}, "prompt", "999"),
        ({"echo": False}, "max_tokens", "unless echo"),
        ({"max_tokens": -1}, "max_tokens", "max_tokens"),
        # 16 x 40,000 characters echoed fit 2^20, but not with their log-probabilities
        ({"prompt": "R" * 40_000, "n": 16, "logprobs": 1}, "echo", "1280000"),
    ],
)
def test_bad_requests(server, body, param, text):
    response = complete(server, **{"prompt": "R", "echo": True, "max_tokens": 0, **body})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param, error
    assert text in error["message"] and error["type"] == "invalid_request_error"


def test_scoring_work_is_admitted(server):
    service = server.service
    body = dict(prompt=[TEXT, TEXT], echo=True, logprobs=1, max_tokens=0)
    with options(service, max_request_tokens=len(TEXT)):  # each prompt's tokens count
        never = complete(server, **body)
    assert never.status_code == 400 and f"{2 * len(TEXT)} tokens" in never.text
    service.scheduler.submit([], reserve=service.options.max_queued_tokens - len(TEXT))
    try:
        busy = complete(server, **body)
    finally:
        service.scheduler.release(service.options.max_queued_tokens - len(TEXT))
    assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
    assert complete(server, **body).status_code == 200 and service.scheduler.idle


def test_scored_on_the_scorer_thread_in_one_call(server, monkeypatch):
    calls = []

    def score_texts(model, texts, *args, **kwargs):
        calls.append((threading.current_thread().name, len(texts)))
        return original(model, texts, *args, **kwargs)

    original = scoring.score_texts
    monkeypatch.setattr(scoring, "score_texts", score_texts)
    prompts = [TEXT, TEXT[5:], "ROMEO:"]
    out = complete(server, prompt=prompts, echo=True, logprobs=1, max_tokens=0, seed=1)
    assert out.status_code == 200
    [(thread, texts)] = calls  # every window of the three prompts in one scorer call
    assert thread.startswith("scorer") and texts == 3


def test_scoring_holds_up_neither_the_loop_nor_decoding(server, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    original = scoring.score_texts

    def held(*args, **kwargs):  # a scoring that takes as long as the test wants
        entered.set()
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_texts", held)
    body = dict(echo=True, logprobs=4, max_tokens=0)  # not a cached request
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        scored = pool.submit(complete, server, prompt=TEXT, **body)
        assert entered.wait(30)
        with options(server.service, request_timeout=0.2):
            late = pool.submit(complete, server, prompt="ROMEO:", **body)  # waits behind it
            time.sleep(0.5)
        out = httpx.post(  # decodes meanwhile
            f"{server.url}/v1/completions",
            json={"prompt": "JULIET:", "max_tokens": 20, "seed": 4},
            timeout=10,
        )
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 20
        release.set()
        assert scored.result().status_code == 200
        assert late.result().status_code == 504  # its deadline passed before it started


def test_int8_scores_with_the_int8_weights(workdir):
    # 8 slots: the engine decodes through int8 dots until its warm-up measures otherwise.
    service = Service.from_workdir(workdir, num_slots=8, quantize="int8")
    assert service.scheduler.engine.int8_dots
    leaves = jax.tree.leaves(service.scorer.model)
    assert any(x.dtype == np.int8 for x in leaves)
    engine_leaves = jax.tree.leaves(service.scheduler.engine.weights)
    assert all(x is y for x, y in zip(leaves, engine_leaves, strict=True))
