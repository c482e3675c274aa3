"""Samples text from a trained workdir.

python -m charlm_jax.generate --workdir=DIR --prompt="ROMEO:" --num_samples=3
python -m charlm_jax.generate --workdir=DIR --prompts_file=prompts.txt --temperature=0.8
python -m charlm_jax.generate --workdir=DIR --prompt="JULIET:" --beam_size=4
python -m charlm_jax.generate --workdir=DIR --interactive
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from charlm_jax import cli
from charlm_jax.decoding.sampling import STREAM_CHUNK, Sampler, check_sampling_args
from charlm_jax.errors import UserError

flags.DEFINE_string("workdir", None, "A trained run's directory.", required=True)
flags.DEFINE_string("checkpoint", "best", 'Checkpoint: "best", "latest" or a step number.')
flags.DEFINE_string("prompt", "", "Text to continue; empty starts from a newline.")
flags.DEFINE_string("prompts_file", None, "A file of prompts, one per line, sampled as one batch.")
flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
flags.DEFINE_integer("max_new_tokens", 500, "Tokens (characters, for char models) per sample.")
flags.DEFINE_float("temperature", None, "Sampling temperature (default 1; 0 is greedy).")
flags.DEFINE_integer("top_k", None, "Keep only the k most likely characters (0: all).")
flags.DEFINE_float("top_p", None, "Keep the most likely characters up to this total probability.")
flags.DEFINE_integer("beam_size", 1, "Beam search with this many beams (no sampling options).")
flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same text.")
flags.DEFINE_string("stop", None, "Cut each sample before the first occurrence of this text.")
flags.DEFINE_bool("interactive", False, "Prompt loop; type `help` for its commands.")
flags.DEFINE_string("quantize", "none", 'Dense layers: "none" (float32) or "int8" dots.')
cli.define_compilation_cache_flag()
FLAGS = flags.FLAGS

HELP = """Type a prompt and press Enter to continue it. Commands:
  temp X     temperature (0 is greedy)      topk K   keep the K most likely (0: all)
  length N   characters per answer          topp P   nucleus sampling, 0 < P <= 1
  seed N     random seed                    help     this text
  quit       leave (or Ctrl-D)"""
SETTINGS = {"temp": ("temperature", float), "length": ("max_new_tokens", int),
            "topk": ("top_k", int), "topp": ("top_p", float), "seed": ("seed", int)}  # fmt: skip


def _read_prompts() -> list[str]:
    if FLAGS.prompts_file is None:
        return [FLAGS.prompt]
    path = Path(FLAGS.prompts_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompts file {path}: {e}") from None
    if not lines:
        raise UserError(f"prompts file is empty: {path}")
    return lines


def interactive(sampler: Sampler, settings: dict) -> None:
    """A prompt loop that streams each answer as it is generated."""
    print(HELP)
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        words = line.split()
        if line.strip() in ("quit", "exit"):
            return
        if line.strip() == "help":
            print(HELP)
            continue
        if len(words) == 2 and words[0] in SETTINGS:
            name, kind = SETTINGS[words[0]]
            try:
                new = {**settings, name: kind(words[1])}
                check_sampling_args(new["temperature"], new["top_k"], new["top_p"],
                                    new["max_new_tokens"])  # fmt: skip
            except ValueError as e:
                print(f"error: {e}\n{HELP}")
                continue
            settings.update(new)
            print(f"{name} = {settings[name]}")
            continue
        try:
            print(line, end="", flush=True)
            for pieces in sampler.stream([line], chunk=STREAM_CHUNK, **settings):
                print(pieces[0], end="", flush=True)
            print()
        except ValueError as e:
            print(f"\nerror: {e}\n{HELP}")


def main(argv: list[str]) -> None:
    cli.start(argv)
    cli.use_compilation_cache(FLAGS.compilation_cache)
    with cli.exit_on_error():  # UserError is a ValueError; so are bad sampling options
        if FLAGS.num_samples < 1:
            raise UserError(f"--num_samples must be >= 1, got {FLAGS.num_samples}")
        with cli.stderr_held():
            sampler = Sampler.from_workdir(
                FLAGS.workdir, cli.checkpoint_arg(FLAGS.checkpoint), FLAGS.quantize
            )
        if FLAGS.interactive:
            interactive(sampler, {
                "temperature": 1.0 if FLAGS.temperature is None else FLAGS.temperature,
                "top_k": FLAGS.top_k or 0,
                "top_p": 1.0 if FLAGS.top_p is None else FLAGS.top_p,
                "max_new_tokens": FLAGS.max_new_tokens,
                "seed": FLAGS.seed,
            })  # fmt: skip
            return
        prompts = [p for p in _read_prompts() for _ in range(FLAGS.num_samples)]
        texts = sampler.generate(
            prompts, FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p,
            seed=FLAGS.seed, stop=FLAGS.stop, beam_size=FLAGS.beam_size,
        )  # fmt: skip
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        if i:
            print("-" * 40)
        print(prompt + text)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser())
