import io
import urllib.request

import jax
import numpy as np
import pytest
from conftest import tiny_config

from charlm_jax import data
from charlm_jax.errors import UserError


def test_default_is_embedded_tiny_shakespeare():
    text = data.load_text(tiny_config().data)
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")


def test_user_file(text_file):
    config = tiny_config(**{"data.path": str(text_file)}).data
    assert data.load_text(config) == text_file.read_text()


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="data file not found: .*nope.txt"):
        data.load_text(tiny_config(**{"data.path": str(tmp_path / "nope.txt")}).data)


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="data file is empty"):
        data.load_text(tiny_config(**{"data.path": str(tmp_path / "empty.txt")}).data)


def test_not_utf8(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(UserError, match="not valid UTF-8"):
        data.load_text(tiny_config(**{"data.path": str(tmp_path / "bin.txt")}).data)


def test_split_by_position():
    tokens = np.arange(1000)
    train, val = data.split_tokens(tokens, 0.1, sequence_length=16)
    assert train.tolist() == list(range(900)) and val.tolist() == list(range(900, 1000))


def test_split_too_short():
    with pytest.raises(UserError, match="data too short: 100 tokens"):
        data.split_tokens(np.arange(100), 0.1, sequence_length=16)


def test_sample_batch_targets_are_next_tokens():
    tokens = jax.numpy.arange(500)
    x, y = jax.jit(data.sample_batch, static_argnums=(2, 3))(tokens, jax.random.key(0), 6, 16)
    assert x.shape == y.shape == (6, 16)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) + 1)
    np.testing.assert_array_equal(np.asarray(x[:, 1:]), np.asarray(x[:, :-1]) + 1)
    assert int(x.min()) >= 0 and int(y.max()) <= 499


def _fake_urlopen(calls, payload=b"To be, or not to be"):
    def urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(payload)

    return urlopen


def test_download_only_when_asked_and_absent(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen(calls))
    target = tmp_path / "sub" / "input.txt"
    config = tiny_config(**{"data.path": str(target)}).data
    with pytest.raises(UserError, match="not found"):
        data.load_text(config)  # data.download is off by default
    assert calls == []
    config.download = True
    assert data.load_text(config) == "To be, or not to be"
    assert calls == [data.TINY_SHAKESPEARE_URL]
    assert data.load_text(config) == "To be, or not to be"  # present now: no second download
    assert len(calls) == 1


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    def fail(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    with pytest.raises(UserError, match="cannot download .*no network"):
        data.download("http://example.invalid/x.txt", tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()
