"""vLLM's tokenizer routes and token-id prompts, through the live server of test_serve.py."""

import httpx
from test_serve import TEXT, client, compilation_cache, server, workdir  # noqa: F401 (fixtures)

from charlm_jax.data.tokenizers import CharTokenizer

TOKENIZER = CharTokenizer.from_text(TEXT)  # the served model's


def _post(server, path: str, body: dict) -> httpx.Response:  # noqa: F811 (a fixture's name)
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def _assert_error(response: httpx.Response, param: str, message: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"


def test_tokenize_and_detokenize(server):  # noqa: F811
    response = _post(server, "/tokenize", {"prompt": "ROMEO: to be", "return_token_strs": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tokens"] == TOKENIZER.encode("ROMEO: to be").tolist()
    assert body["count"] == 12 and body["max_model_len"] == 16
    assert "".join(body["token_strs"]) == "ROMEO: to be"
    response = _post(server, "/detokenize", {"tokens": body["tokens"]})
    assert response.json() == {"prompt": "ROMEO: to be"}


def test_tokenizer_info(server):  # noqa: F811
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=60).json()
    assert info["vocab_size"] == TOKENIZER.vocab_size and info["kind"] == "char"
    assert info["model_max_length"] == 16 and info["eos_token"] is None


def test_bad_tokens_and_text_are_400(server):  # noqa: F811
    _assert_error(_post(server, "/detokenize", {"tokens": [0, 99]}), "tokens", "token id 99")
    _assert_error(_post(server, "/detokenize", {"tokens": [-1]}), "tokens", "token id -1")
    _assert_error(_post(server, "/tokenize", {"prompt": "Z"}), "prompt", "unknown character")
    _assert_error(_post(server, "/tokenize", {"text": "a"}), "prompt", "Field required")


def test_token_id_prompts(server, client):  # noqa: F811
    ids = TOKENIZER.encode("ROMEO:").tolist()
    greedy = {"max_tokens": 8, "temperature": 0}
    by_text = client.completions.create(model="tiny", prompt="ROMEO:", **greedy)
    by_ids = client.completions.create(model="tiny", prompt=ids, **greedy)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    both = client.completions.create(model="tiny", prompt=[ids, ids[:2]], echo=True, **greedy)
    assert both.choices[0].text.startswith("ROMEO:") and both.choices[1].text.startswith("RO")
    response = _post(server, "/v1/completions", {"prompt": [[1, 2], [3, 999]], "max_tokens": 2})
    _assert_error(response, "prompt", "token id 999 is outside the vocabulary")
