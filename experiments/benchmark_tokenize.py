"""Tokenizing a corpus too large to hold: time and peak memory of building the tokenizer and
writing the memory-mapped token cache, for a generated text file (tiny Shakespeare's lines,
shuffled, with some non-ASCII text) of --size_mb in /tmp. A second run reuses the cache.

    python experiments/benchmark_tokenize.py --tokenizer=char --size_mb=200
    python experiments/benchmark_tokenize.py --tokenizer=bpe --vocab_size=1024
"""

import resource
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from charlm_jax import config_defaults
from charlm_jax.data import pipeline, text_files
from charlm_jax.data.tokenizers import create_tokenizer

flags.DEFINE_integer("size_mb", 200, "Size of the generated text file.")
flags.DEFINE_string("path", "/tmp/charlm_benchmark/corpus.txt", "Where the file goes.")
flags.DEFINE_enum("tokenizer", "char", ["char", "bpe"], "data.tokenizer")
flags.DEFINE_integer("vocab_size", 1024, "data.vocab_size (BPE)")
FLAGS = flags.FLAGS


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(path: Path, size_mb: int) -> None:
    """Writes shuffled lines of tiny Shakespeare, 1 MB at a time, until `size_mb`."""
    if path.exists() and path.stat().st_size >= size_mb << 20:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = text_files.embedded_tiny_shakespeare().read_text(encoding="utf-8").splitlines(True)
    lines += ["Ça va, très bien — naïve café.\n", "日本語のテキスト 😀\n"]
    rng = np.random.default_rng(0)
    with path.open("w", encoding="utf-8") as f:
        while f.tell() < size_mb << 20:
            f.write("".join(lines[i] for i in rng.integers(0, len(lines), 30_000)))


def main(argv):
    del argv
    path = Path(FLAGS.path)
    start = time.perf_counter()
    generate(path, FLAGS.size_mb)
    size_mb = path.stat().st_size / 2**20
    print(f"file: {path}, {size_mb:.0f} MB (made in {time.perf_counter() - start:.1f} s)")
    config = config_defaults.base_config({}).data  # the defaults every config file has
    config.path, config.tokenizer, config.vocab_size = str(path), FLAGS.tokenizer, FLAGS.vocab_size
    config.memmap_above_mb = 0.0
    corpus = pipeline.open_corpus(config)
    base = peak_rss_mb()
    print(f"peak RSS after imports: {base:.0f} MB")

    start = time.perf_counter()
    train_part = corpus.chunks(1.0 - config.val_fraction)
    tokenizer = create_tokenizer(config, corpus.chunks(), train_part)
    built = time.perf_counter() - start
    print(f"{FLAGS.tokenizer} tokenizer ({tokenizer.vocab_size} tokens) built in {built:.1f} s")

    start = time.perf_counter()
    tokens = corpus.tokens(tokenizer)
    encoded = time.perf_counter() - start
    print(
        f"tokens: {len(tokens):,} {tokens.dtype} in {encoded:.1f} s ({size_mb / encoded:.1f} MB/s)"
    )
    start = time.perf_counter()
    corpus.tokens(tokenizer)
    print(f"cached tokens opened again in {time.perf_counter() - start:.3f} s")
    print(f"peak RSS: {peak_rss_mb():.0f} MB ({peak_rss_mb() - base:.0f} MB above the imports)")


if __name__ == "__main__":
    app.run(main)
