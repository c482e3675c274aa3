"""The server when its engine fails (issue 25): a dead engine thread, a step that never
returns, a failed warm-up. Live servers on 127.0.0.1 over a scripted engine (no model, no
compilation), so that each test can break one; and one request through int8 dots."""

import threading
import time

import httpx
import numpy as np
import openai
import pytest
from test_cli import main_in_process
from test_serve import TEXT, LiveServer, metric, wait_until

from charlm_jax.data.tokenizers import CharTokenizer
from charlm_jax.decoding import engine
from charlm_jax.server.service import ModelInfo, ServeOptions, Service

TOKENIZER = CharTokenizer.from_text(TEXT)


class ScriptedEngine:
    """The engine's interface over slots that each emit token 0, one token per step, until
    their max_new_tokens. `fail` (an exception) makes the next step raise it; `hold` (an
    Event) makes steps wait for it."""

    def __init__(self, num_slots: int = 2, context_length: int = 16):
        self.num_slots, self.context_length = num_slots, context_length
        self.vocab_size = TOKENIZER.vocab_size
        self.requests: list = [None] * num_slots
        self.drawn = [0] * num_slots
        self.fail: BaseException | None = None
        self.hold: threading.Event | None = None

    def warm_up(self) -> None:
        pass

    def active_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.requests) if r is not None]

    def insert(self, request: engine.Request) -> int:
        slot = self.requests.index(None)
        self.requests[slot], self.drawn[slot] = request, 0
        return slot

    def free(self, slot: int) -> None:
        self.requests[slot] = None

    def step(self) -> list[engine.StepOutput]:
        if self.fail is not None:
            raise self.fail
        if self.hold is not None:
            self.hold.wait()
        time.sleep(0.002)
        outputs = []
        for slot in self.active_slots():
            self.drawn[slot] += 1
            finished = self.drawn[slot] >= self.requests[slot].max_new_tokens
            if finished:
                self.requests[slot] = None
            top = np.zeros((1, engine.TOP_LOGPROBS))
            outputs.append(
                engine.StepOutput(slot, np.zeros(1, np.int32), np.zeros(1), top, top, finished)
            )
        return outputs


def scripted_server(**options) -> tuple[LiveServer, ScriptedEngine]:
    engine_ = ScriptedEngine()
    service = Service(engine_, TOKENIZER, ModelInfo("scripted", 1), ServeOptions(**options))
    return LiveServer(service), engine_


def client_of(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=30)


def assert_failed(server: LiveServer, reason: str) -> None:
    """The engine failed: probes say so and new requests get 503 naming `reason`."""
    for path in ("/health", "/ready"):
        assert httpx.get(server.url + path).status_code == 503
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "R"})
    assert refused.status_code == 503 and reason in refused.json()["error"]["message"]


def start_stream_and_queue(server: LiveServer, client: openai.OpenAI):
    """Two long streams in both slots and a whole request waiting behind them (in a
    thread): returns the streams' iterators and the waiting request's future result."""
    streams = [
        iter(client.completions.create(model="scripted", prompt="R", max_tokens=2000, stream=True))
        for _ in range(2)
    ]
    for stream in streams:
        next(stream)
    waiting: dict = {}

    def wait():
        try:
            client.completions.create(model="scripted", prompt="R", max_tokens=5)
        except openai.APIStatusError as e:
            waiting["error"] = e

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    wait_until(lambda: metric(server, "charlm_requests_waiting") == 1)
    return streams, thread, waiting


@pytest.mark.parametrize(
    "error, reason",
    [
        (RuntimeError("the device is gone"), "the device is gone"),  # the thread catches it
        pytest.param(  # ends the thread without a word: the watchdog notices
            SystemExit(),
            "ended unexpectedly",
            marks=pytest.mark.filterwarnings(
                "ignore::pytest.PytestUnhandledThreadExceptionWarning"
            ),
        ),
    ],
)
def test_engine_thread_death_fails_everything_with_503(error, reason):
    server, engine_ = scripted_server()
    try:
        client = client_of(server)
        streams, thread, waiting = start_stream_and_queue(server, client)
        engine_.fail = error
        for stream in streams:  # each stream ends with an error event, as JSON
            with pytest.raises(openai.APIError, match=reason):
                list(stream)
        thread.join(10)
        assert waiting["error"].status_code == 503
        assert_failed(server, reason)
    finally:
        server.stop()


def test_a_step_past_its_deadline_fails_everything_with_503():
    server, engine_ = scripted_server(step_timeout=0.5)
    try:
        client = client_of(server)
        streams, thread, waiting = start_stream_and_queue(server, client)
        engine_.hold = threading.Event()  # the next step never returns
        for stream in streams:
            with pytest.raises(openai.APIError, match="longer than 0.5s"):
                list(stream)
        thread.join(10)
        assert waiting["error"].status_code == 503
        assert_failed(server, "longer than 0.5s")
    finally:
        if engine_.hold is not None:
            engine_.hold.set()  # the wedged thread returns, and ends
        server.stop()


def test_a_failed_start_turns_health_to_503(monkeypatch):
    def broken_warm_up(self):
        raise RuntimeError("out of device memory")

    monkeypatch.setattr(ScriptedEngine, "warm_up", broken_warm_up)
    server = LiveServer(Service(ScriptedEngine(), TOKENIZER, ModelInfo("scripted", 1)))
    try:
        assert_failed(server, "out of device memory")
    finally:
        server.stop()


def test_stop_during_warm_up_does_not_wait_for_it(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(ScriptedEngine, "warm_up", lambda self: release.wait(30))
    service = Service(ScriptedEngine(), TOKENIZER, ModelInfo("scripted", 1))
    service.scheduler.start()
    start = time.monotonic()
    service.scheduler.stop()
    assert time.monotonic() - start < 5
    release.set()


def test_server_flags_are_checked(capfd):
    # absl's bound names the flag, in one line (every numeric flag has one; one is enough to
    # see the mechanism)
    result = main_in_process(capfd, "charlm_jax.serve", "--workdir=unused", "--max_queue=0")
    assert result.returncode != 0 and "--max_queue=0" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
