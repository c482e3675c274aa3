import io
import subprocess
import sys
import urllib.request

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_config

from charlm_jax import config_defaults
from charlm_jax.data import batching, pipeline, text_files, token_cache
from charlm_jax.data.tokenizers import BpeTokenizer, CharTokenizer
from charlm_jax.errors import UserError


def test_default_is_embedded_tiny_shakespeare():
    text = text_files.read_text(tiny_config().data)
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")


def test_user_file(text_file):
    config = tiny_config(**{"data.path": str(text_file)}).data
    assert text_files.read_text(config) == text_file.read_text()


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="data file not found: .*nope.txt"):
        text_files.read_text(tiny_config(**{"data.path": str(tmp_path / "nope.txt")}).data)


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="data file is empty"):
        text_files.read_text(tiny_config(**{"data.path": str(tmp_path / "empty.txt")}).data)


def test_not_utf8(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"abc\n\xff\xfe\x00abc")
    config = tiny_config(**{"data.path": str(tmp_path / "bin.txt")}).data
    with pytest.raises(UserError, match="not valid UTF-8 text: byte 0xff at offset 4; .*replace"):
        text_files.read_text(config)
    config.decode_errors = "replace"
    assert text_files.read_text(config) == "abc\n\ufffd\ufffd\x00abc"


def test_not_utf8_in_a_large_file_names_the_byte_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 5)
    path = tmp_path / "big.txt"
    path.write_bytes("é\nabc é\n".encode() * 3 + b"xy\xc3(")  # a bad sequence at 32
    with pytest.raises(UserError, match="byte 0xc3 at offset 32"):
        list(text_files.FileCorpus(path).chunks())
    replaced = "".join(text_files.FileCorpus(path, errors="replace").chunks())
    assert replaced == "é\nabc é\n" * 3 + "xy\ufffd("


def test_split_by_position():
    tokens = np.arange(1000)
    train, val = pipeline.split_tokens(tokens, 0.1, context_length=16)
    assert train.tolist() == list(range(900)) and val.tolist() == list(range(900, 1000))


def test_split_too_short():
    with pytest.raises(UserError, match="data too short: 100 tokens"):
        pipeline.split_tokens(np.arange(100), 0.1, context_length=16)


def test_sample_batch_targets_are_next_tokens():
    tokens = jax.numpy.arange(500)
    x, y = jax.jit(batching.sample_batch, static_argnums=(2, 3))(tokens, jax.random.key(0), 6, 16)
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
        text_files.read_text(config)  # text_files.download is off by default
    assert calls == []
    config.download = True
    assert text_files.read_text(config) == "To be, or not to be"
    assert calls == [config_defaults.TINY_SHAKESPEARE_URL]
    assert text_files.read_text(config) == "To be, or not to be"  # present now: no second download
    assert len(calls) == 1


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    def fail(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    with pytest.raises(UserError, match="cannot download .*no network"):
        text_files.download("http://example.invalid/x.txt", tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


def test_file_corpus_chunks_are_the_text_cut_after_newlines(tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 32)  # reads end inside multi-byte characters
    text = "".join(f"l{i}: été 😀\n" for i in range(30)) + "no newline at the end"
    path = tmp_path / "t.txt"
    path.write_text(text)
    chunks = list(text_files.FileCorpus(path).chunks())
    assert "".join(chunks) == text and len(chunks) > 10
    assert all(c.endswith("\n") for c in chunks[:-1])
    head = "".join(text_files.FileCorpus(path).chunks(0.5))
    assert text.startswith(head) and abs(len(head.encode()) - len(text.encode()) / 2) < 30


def _large_corpus(tmp_path, text_file):
    config = tiny_config(**{"data.path": str(text_file), "data.memmap_above_mb": 0.0}).data
    corpus = pipeline.open_corpus(config)
    assert isinstance(corpus, text_files.FileCorpus)
    return corpus


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_token_cache_equals_in_memory_tokens_and_is_reused(tmp_path, text_file, kind, monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 4096)
    text = text_file.read_text()
    corpus = _large_corpus(tmp_path, text_file)
    if kind == "char":
        tokenizer = CharTokenizer.from_text(corpus.chunks())
    else:
        tokenizer = BpeTokenizer.train(corpus.chunks(0.9), vocab_size=200)
    tokens = corpus.tokens(tokenizer)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint8
    np.testing.assert_array_equal(tokens, tokenizer.encode(text))
    (cache,) = tmp_path.glob("text.txt.*.tokens")

    def fail(text):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(tokenizer, "encode", fail)
    np.testing.assert_array_equal(corpus.tokens(tokenizer), tokens)  # read back, not rebuilt


def test_token_cache_follows_the_text_and_the_tokenizer(tmp_path, text_file):
    corpus = _large_corpus(tmp_path, text_file)
    first = corpus.tokens(CharTokenizer.from_text(text_file.read_text()))
    (old,) = tmp_path.glob("text.txt.*.tokens")
    text_file.write_text(text_file.read_text()[::-1])
    second = corpus.tokens(CharTokenizer.from_text(text_file.read_text()))
    assert second.tolist() == first.tolist()[::-1]
    (new,) = tmp_path.glob("text.txt.*.tokens")  # the old text's tokens are gone
    third = corpus.tokens(CharTokenizer.from_text(text_file.read_text(), allow_unknown=True))
    assert new != old and len(third) == len(second)
    assert len(list(tmp_path.glob("text.txt.*.tokens"))) == 2  # one per tokenizer
    assert token_cache.token_dtype(256) == np.uint8 and token_cache.token_dtype(257) == np.uint16


def test_memory_mapped_batches_equal_in_memory_batches(tmp_path, text_file):
    corpus = _large_corpus(tmp_path, text_file)
    tokenizer = CharTokenizer.from_text(corpus.chunks())
    mapped = corpus.tokens(tokenizer)
    on_device = jax.numpy.asarray(tokenizer.encode(text_file.read_text()))
    key = jax.random.key(3)
    sample = jax.jit(batching.sample_batch, static_argnums=(2, 3))
    for step in (0, 1, 17):
        batch_key, _ = batching.step_keys(key, step)
        host_x, host_y = batching.sample_batch_numpy(mapped, batch_key, 8, 32)
        device_x, device_y = sample(on_device, batch_key, 8, 32)
        assert host_x.dtype == np.int32
        np.testing.assert_array_equal(host_x, device_x)
        np.testing.assert_array_equal(host_y, device_y)
    batches = batching.PrefetchedBatches(mapped, key, 8, 32, start_step=5)
    try:
        for step in range(5, 9):  # prefetched in order, from each step's key
            x, _ = next(batches)
            expected, _ = batching.sample_batch_numpy(
                mapped, batching.step_keys(key, step)[0], 8, 32
            )
            np.testing.assert_array_equal(np.asarray(x), expected)
    finally:
        batches.close()


def test_chars_per_token():
    char = CharTokenizer.from_text("abc")
    assert pipeline.chars_per_token(char, char.encode("abcabc")) == 1.0
    text = "ab ab ab abc abc\n" * 50
    bpe = BpeTokenizer.train([text], vocab_size=8)
    ids = bpe.encode(text)
    assert pipeline.chars_per_token(bpe, ids) == pytest.approx(len(text) / len(ids))


def test_load_dataset_returns_the_tokenizer_and_the_splits(text_file):
    config = tiny_config(**{"data.path": str(text_file)}).data
    dataset = pipeline.load_dataset(config)
    text = text_file.read_text()
    tokens = np.concatenate([dataset.train, dataset.val])
    np.testing.assert_array_equal(tokens, dataset.tokenizer.encode(text))
    assert len(dataset.train) == int(len(text) * 0.9)
    assert dataset.chars_per_token == 1.0 and dataset.on_device
    again = pipeline.load_dataset(config, dataset.tokenizer)  # a resumed run's tokenizer, as is
    assert again.tokenizer is dataset.tokenizer
    np.testing.assert_array_equal(again.val, dataset.val)


@pytest.mark.parametrize("field", ["source", "decode_errors", "batches"])
def test_check_config_names_a_bad_choice(field):
    config = tiny_config().data
    pipeline.check_config(config)
    config[field] = "nope"
    with pytest.raises(UserError, match=f"data.{field} must be one of .*, got 'nope'"):
        pipeline.check_config(config)


def test_loading_a_config_file_imports_neither_jax_nor_the_data_stack():
    code = (
        "import sys, configs.transformer, configs.mlp;"
        "loaded = {'jax', 'tqdm', 'tokenizers'} & set(sys.modules);"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
