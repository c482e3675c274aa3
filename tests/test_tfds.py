"""TFDS without TensorFlow: local corpora prepared as datasets, catalog datasets offline."""

import importlib.util
import shutil
import sys

import pytest
from conftest import tiny_config

from charlm_jax.data import pipeline, text_files, tfds_text
from charlm_jax.errors import UserError


def tfds_config(tmp_path, **overrides):
    return tiny_config(
        **{"data.source": "tfds", "data.tfds_data_dir": str(tmp_path / "tfds"), **overrides}
    ).data


def test_local_corpus_prepares_and_reads_back_exactly_the_text(tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 16)  # several records per file
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("Première ligne 😀\nseconde ligne\n" * 3)
    (folder / "b.txt").write_text("日本語のテキスト\nno final newline")
    (folder / ".hidden").write_text("left out")
    expected = (folder / "a.txt").read_text() + (folder / "b.txt").read_text()
    config = tfds_config(tmp_path, **{"data.tfds_name": "my_corpus", "data.path": str(folder)})
    corpus = pipeline.open_corpus(config)
    assert isinstance(corpus, text_files.TextCorpus) and corpus.text == expected
    builder = tfds_text.local_builder(config)
    assert builder.info.full_name == "local_text/my_corpus/1.0.0"
    assert builder.info.splits["train"].num_examples > 3
    assert (builder.data_path / "local_text-train.array_record-00000-of-00001").exists()

    def fail(self):
        raise AssertionError("prepared again")

    monkeypatch.setattr(tfds_text.LocalText, "_generate_examples", fail)
    assert tfds_text.read_tfds_text(config) == expected  # the prepared dataset, read back
    monkeypatch.undo()
    (folder / "b.txt").write_text("changed")  # a changed corpus is prepared again
    assert tfds_text.read_tfds_text(config) == (folder / "a.txt").read_text() + "changed"
    files = f"{folder / 'b.txt'}, {folder / 'a.txt'}"
    config = tfds_config(tmp_path, **{"data.tfds_name": "two", "data.path": files})
    assert tfds_text.read_tfds_text(config) == "changed" + (folder / "a.txt").read_text()
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules


def test_catalog_dataset_from_a_manual_dir(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(text_files.embedded_tiny_shakespeare(), manual / "input.txt")
    config = tfds_config(tmp_path, **{"data.tfds_name": "tiny_shakespeare"})
    with pytest.raises(UserError, match="not prepared in .*data.tfds_manual_dir"):
        tfds_text.read_tfds_text(config)
    config.tfds_manual_dir = str(manual)
    # Its train, validation and test splits, in order, are the whole file.
    assert tfds_text.read_tfds_text(config) == text_files.embedded_tiny_shakespeare().read_text()
    config.tfds_manual_dir = ""
    assert len(tfds_text.read_tfds_text(config)) == 1_115_394  # prepared: no sources needed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.tfds_name": "no_such_dataset"}, "TFDS dataset 'no_such_dataset' not found"),
        ({"data.tfds_name": ""}, "data.source=tfds needs data.tfds_name"),
        ({"data.tfds_name": "x", "data.path": "EMPTY"}, "data folder is empty"),
        ({"data.tfds_name": "x", "data.path": "/nonexistent.txt"}, "data file not found"),
    ],
)
def test_bad_tfds_input(tmp_path, overrides, message):
    (tmp_path / "empty").mkdir()
    if overrides.get("data.path") == "EMPTY":
        overrides["data.path"] = str(tmp_path / "empty")
    with pytest.raises(UserError, match=message):
        pipeline.open_corpus(tfds_config(tmp_path, **overrides))
