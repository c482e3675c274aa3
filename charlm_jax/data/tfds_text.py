"""TensorFlow Datasets without TensorFlow: a local text corpus (a file, several files or a
folder) prepared as a versioned TFDS dataset in `array_record` format, and plain-text
catalog datasets (`tiny_shakespeare`, ...); both read back through TFDS data sources.

Records keep their order (no shuffling); the text is their concatenation: for a catalog
dataset, its splits in the order train, validation, test (then any others), so
`data.val_fraction` takes the end of it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from charlm_jax.data.text_files import FileCorpus, decode_text
from charlm_jax.errors import UserError

SPLIT_ORDER = ("train", "validation", "test")


def _open_text(path: str, mode: str = "r"):
    return open(path, mode, encoding=None if "b" in mode else "utf-8")  # noqa: SIM115


# Stands in for TensorFlow where a catalog builder only reads its source files with it.
_GFILE_SHIM = types.SimpleNamespace(
    io=types.SimpleNamespace(
        gfile=types.SimpleNamespace(exists=os.path.exists, isdir=os.path.isdir, GFile=_open_text)
    )
)


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Local text files as a TFDS dataset named by its config: one `train` split whose
    records, in order, are the files' text in chunks cut after newlines."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Text of local files, in chunks, in order."}

    def __init__(self, *, files: Sequence[Path] = (), decode_errors: str = "strict", **kwargs):
        self._files = [Path(f) for f in files]
        self._decode_errors = decode_errors
        super().__init__(**kwargs)

    def fingerprint(self) -> str:
        """Names, sizes and modification times of the source files."""
        stats = [(f.resolve(), f.stat()) for f in self._files]
        return ";".join(f"{p}:{st.st_size}:{st.st_mtime_ns}" for p, st in stats)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files (charlm_jax).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(sources=self.fingerprint()),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        key = 0
        for path in self._files:
            for text in FileCorpus(path, self._decode_errors).chunks():
                yield key, {"text": text}
                key += 1


def local_files(path_spec: str) -> list[Path]:
    """The files of `path_spec`: a file, files separated by commas, or a folder (its files,
    sorted by name, hidden ones left out)."""
    files = []
    for part in (p.strip() for p in path_spec.split(",") if p.strip()):
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
            if not found:
                raise UserError(f"data folder is empty: {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"data file not found: {path}")
    if not files:
        raise UserError("data.path names no files")
    return files


def _data_dir(config: ml_collections.ConfigDict) -> str | None:
    return str(Path(config.tfds_data_dir).expanduser()) if config.tfds_data_dir else None


def local_builder(config: ml_collections.ConfigDict) -> LocalText:
    """The prepared local-corpus dataset `config.tfds_name` of the files `config.path` names;
    prepared on first use, and again when those files change."""
    files = local_files(config.path)
    builder_config = tfds.core.BuilderConfig(name=config.tfds_name)

    def make() -> LocalText:
        return LocalText(
            files=files,
            decode_errors=config.decode_errors,
            config=builder_config,
            data_dir=_data_dir(config),
            file_format="array_record",
        )

    builder = make()
    if builder.is_prepared() and builder.info.metadata["sources"] != builder.fingerprint():
        logging.warning("The files of %s changed: preparing it again", builder.data_path)
        shutil.rmtree(builder.data_path)
        builder = make()
    builder.download_and_prepare()
    return builder


def catalog_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The catalog dataset `config.tfds_name`, prepared from `tfds_manual_dir` (offline) or
    downloaded (`tfds_download`) when it is not prepared yet."""
    try:
        builder = tfds.builder(
            config.tfds_name, data_dir=_data_dir(config), file_format="array_record"
        )
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"TFDS dataset {config.tfds_name!r} not found in the catalog (for a local corpus, "
            "set data.path to its files too)"
        ) from None
    if builder.is_prepared():
        return builder
    manual_dir = str(Path(config.tfds_manual_dir).expanduser()) if config.tfds_manual_dir else None
    if not (manual_dir or config.tfds_download):
        raise UserError(
            f"TFDS dataset {config.tfds_name!r} is not prepared in {builder.data_dir}; set "
            "data.tfds_manual_dir to a folder holding its source files, or data.tfds_download=True"
        )
    module = sys.modules[type(builder).__module__]
    shim = importlib.util.find_spec("tensorflow") is None and hasattr(module, "tf")
    if shim:
        original, module.tf = module.tf, _GFILE_SHIM
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except (ImportError, AttributeError) as e:
        raise UserError(
            f"preparing TFDS dataset {config.tfds_name!r} needs TensorFlow ({e}): "
            "pip install -e '.[tf]' (reading it once prepared does not)"
        ) from None
    finally:
        if shim:
            module.tf = original
    return builder


def _split_rank(split: str) -> tuple[int, str]:
    name = str(split)
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def read_tfds_text(config: ml_collections.ConfigDict) -> str:
    """The text of the TFDS dataset `config` (the `data` section) names: a local corpus
    when `path` is set, else a catalog dataset."""
    if not config.tfds_name:
        raise UserError("data.source=tfds needs data.tfds_name")
    builder = local_builder(config) if config.path else catalog_builder(config)
    text_features = [
        name
        for name, feature in builder.info.features.items()
        if isinstance(feature, tfds.features.Text)
    ]
    if len(text_features) != 1:
        raise UserError(
            f"TFDS dataset {config.tfds_name!r} has no single text feature "
            f"(features: {', '.join(builder.info.features)})"
        )
    sources = builder.as_data_source()
    order = sorted(sources, key=_split_rank)
    text = "".join(
        decode_text(record[text_features[0]], config.decode_errors, config.tfds_name)
        for split in order
        for record in sources[split]
    )
    if not text:
        raise UserError(f"TFDS dataset {config.tfds_name!r} holds no text")
    return text
