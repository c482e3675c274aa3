"""Shared fixtures: tiny configs and tiny data, so every test runs in seconds on a CPU."""

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

# The suite compiles hundreds of tiny programs, and at LLVM's default optimisation level (3)
# compiling is most of its time; level 0 compiles them ~30% faster and computes the same
# values up to rounding. The tests that compare bits across compiled programs compile those
# at the default level (`default_codegen`). Set before JAX starts; CLI subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    )

import jax  # noqa: E402
import ml_collections  # noqa: E402
import pytest

from charlm_jax.config_defaults import base_config
from charlm_jax.data.text_files import embedded_tiny_shakespeare
from charlm_jax.model.config import default_section
from charlm_jax.training import parallel, train
from configs import mlp  # importable: pytest's `pythonpath` is the repository root

ROOT = Path(__file__).resolve().parents[1]

# GPUs run float32 matmuls as TF32 by default; the tests that compare two computations of the
# same logits (cached vs full, blocked vs whole attention) mean float32. (Not set on CPUs,
# where it only makes XLA pick slower matmul paths.)
if parallel.installed_cuda_extra():
    jax.config.update("jax_default_matmul_precision", "highest")

TINY_MODEL = {
    "transformer": {
        "model.embedding_dim": 32,
        "model.hidden_dim": 64,
        "model.num_layers": 2,
        "model.num_heads": 4,
    },
    "mlp": {"model.embedding_dim": 8, "model.hidden_dim": 32, "model.window": 4},
}
TINY_TRAIN = {
    "data.context_length": 32,
    "train.batch_size": 8,
    "train.num_steps": 40,
    "train.warmup_steps": 5,
    "train.eval_every": 20,
    "train.eval_batches": 2,
    "train.log_every": 10,
    "train.learning_rate": 3e-3,
}


def tiny_config(name: str = "transformer", **overrides):
    # The Transformer's plain defaults: its default preset is the speedrun's recipe.
    plain = {"transformer": lambda: base_config(default_section("transformer")),
             "mlp": mlp.get_config}  # fmt: skip
    config = plain[name]()
    for dotted, value in {**TINY_MODEL[name], **TINY_TRAIN, **overrides}.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return config


_TEMPORARY_CACHE = pytest.StashKey[tempfile.TemporaryDirectory]()


def pytest_configure(config: pytest.Config) -> None:
    """JAX's persistent compilation cache, under pytest's cache folder (a temporary one with
    `-p no:cacheprovider`): the tests compile the same tiny programs many times over, in this
    process and in the CLI subprocesses, which inherit the variables."""
    cache = getattr(config, "cache", None)
    if cache:
        folder = str(cache.mkdir("jax-compilation-cache"))
    else:
        config.stash[_TEMPORARY_CACHE] = tempfile.TemporaryDirectory(suffix="-jax-cache")
        folder = config.stash[_TEMPORARY_CACHE].name
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _TEMPORARY_CACHE in config.stash:
        config.stash[_TEMPORARY_CACHE].cleanup()


def write_text(path: Path) -> Path:
    """Writes the first 20,000 characters of tiny Shakespeare to `path`."""
    path.write_text(embedded_tiny_shakespeare().read_text(encoding="utf-8")[:20_000])
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    """The first 20,000 characters of tiny Shakespeare."""
    return write_text(tmp_path / "text.txt")


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished tiny run: its workdir, its summary, and its config (a fresh copy each call,
    so that a test may change it)."""

    workdir: Path
    summary: dict
    _config: ml_collections.ConfigDict

    def config(self) -> ml_collections.ConfigDict:
        return self._config.copy_and_resolve_references()

    def copy(self, path: Path) -> Path:
        """A copy of the workdir at `path`, for a test that trains in it further."""
        return Path(shutil.copytree(self.workdir, path))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """The tiny Transformer trained 20 steps on `text_file`'s text, evaluated and checkpointed
    every 10 steps: trained once, for every test that needs such a run (never train in its
    workdir: take a copy)."""
    folder = tmp_path_factory.mktemp("trained")
    text = write_text(folder / "text.txt")
    config = tiny_config(**{"data.path": str(text), "train.num_steps": 20, "train.eval_every": 10})
    summary = train.train_and_evaluate(config.copy_and_resolve_references(), folder / "run")
    return TrainedRun(folder / "run", summary, config)
