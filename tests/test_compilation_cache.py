"""The training CLI's persistent compilation cache (`--compilation_cache`): a second run loads
the programs the first compiled instead of compiling them again."""

import os
import re
import subprocess
import sys

from conftest import ROOT
from test_cli import CONFIG, TINY_FLAGS

HIT = re.compile(r"Persistent compilation cache hit for '(\w+)'")


def train(workdir, cache, text_file) -> tuple[list[str], set[str]]:
    """A tiny training run with `--compilation_cache=cache`; the programs it loaded from the
    cache, and the cache's entries after it."""
    # Without the tests' own cache variable, which would override the flag; JAX logs each
    # cache hit at WARNING when it logs compilations.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAX_LOG_COMPILES"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "charlm_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
         *TINY_FLAGS, f"--config.data.path={text_file}", "--config.train.num_steps=4",
         "--config.train.eval_every=2", f"--compilation_cache={cache}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return HIT.findall(result.stderr), {p.name for p in cache.glob("*")}


def test_a_second_run_loads_its_programs_from_the_cache(tmp_path, text_file):
    cache = tmp_path / "cache"
    hits, written = train(tmp_path / "first", cache, text_file)
    assert hits == [] and written  # the first run compiled, and kept what took long
    hits, entries = train(tmp_path / "second", cache, text_file)
    # What the first run kept is loaded, not compiled and written again. (Under load a small
    # program may cross cli.CACHE_MIN_COMPILE_S in one run and not the other.)
    assert "jit_train_step" in hits and len(hits) >= len(written)
    assert {name.split("-")[0] for name in written} <= set(hits)
    assert not {name for name in entries - written if name.startswith("jit_train_step")}
