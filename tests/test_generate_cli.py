"""End-to-end runs of `python -m charlm_jax.generate` on a tiny trained workdir."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, tiny_config
from test_cli import assert_one_line_error, main_in_process

from charlm_jax.training import train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    text = tmp / "text.txt"
    text.write_text("ROMEO: to be or not to be\nJULIET: that is the question\n" * 50)
    config = tiny_config(**{"data.path": str(text), "train.num_steps": 20})
    train.train_and_evaluate(config, tmp / "run")
    return tmp / "run"


def run_generate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "charlm_jax.generate", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, input=stdin,
    )  # fmt: skip


def test_prompt_and_samples(workdir):
    result = run_generate(
        f"--workdir={workdir}", "--prompt=ROMEO:", "--num_samples=2", "--max_new_tokens=30",
        "--top_k=5", "--top_p=0.9", "--temperature=0.7", "--checkpoint=latest",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("-" * 40 + "\n")
    assert len(samples) == 2
    assert all(s.startswith("ROMEO:") and len(s.rstrip("\n")) >= 6 for s in samples)


def test_prompts_file_and_beam_search(workdir, tmp_path, capfd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET: that\n\n")
    result = generate_in_process(
        capfd,
        f"--workdir={workdir}", f"--prompts_file={prompts}", "--max_new_tokens=10",
        "--beam_size=3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("-" * 40 + "\n")
    assert len(samples) == 3
    assert samples[0].startswith("ROMEO:") and samples[1].startswith("JULIET: that")


def test_interactive_session(workdir):
    session = "temp 0.5\nlength 12\ntemp -1\ntopk many\nROMEO:\nhelp\nquit\n"
    result = run_generate(f"--workdir={workdir}", "--interactive", stdin=session)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "temperature = 0.5" in out and "max_new_tokens = 12" in out
    assert "error: temperature must be >= 0" in out
    assert "error: invalid literal for int() with base 10: 'many'" in out
    assert out.count("Commands:") == 4  # at start, after each bad command, on `help`
    answer = out.split("ROMEO:", 1)[1].split("\n\n> ", 1)[0]  # it may hold newlines
    assert len(answer) == 12


def generate_in_process(capfd, *args: str) -> subprocess.CompletedProcess:
    """The generate CLI in this process (the process boundary is covered by `run_generate`)."""
    return main_in_process(capfd, "charlm_jax.generate", *args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt=ROMEO Zed"], "error: unknown character 'Z'"),
        (["--temperature=-1"], "error: temperature must be >= 0"),
        (["--top_p=2"], "error: top_p must be in (0, 1]"),
        (["--beam_size=2", "--temperature=0.5"], "error: beam_size > 1 is deterministic"),
        (["--checkpoint=999"], "error: no checkpoint at step 999"),
        (["--prompts_file=/nonexistent/prompts.txt"], "error: cannot read prompts file"),
    ],
)
def test_bad_input(workdir, capfd, args, message):
    assert_one_line_error(generate_in_process(capfd, f"--workdir={workdir}", *args), message)


def test_missing_workdir(tmp_path, capfd):
    assert_one_line_error(
        generate_in_process(capfd, f"--workdir={tmp_path / 'nope'}"), "error: no checkpoints in"
    )
    assert_one_line_error(run_generate(), "error: flag --workdir=None")


def test_damaged_checkpoint_is_one_line(workdir, tmp_path):
    damaged = tmp_path / "run"
    shutil.copytree(workdir, damaged)
    for f in (damaged / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data files of OCDBT
            f.write_bytes(b"garbage")
    result = run_generate(f"--workdir={damaged}")
    assert_one_line_error(result, "error: cannot restore checkpoint 20 in")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no stray tracebacks


def test_interactive_mode_streams_in_chunks(monkeypatch, capsys):
    from test_sampling import make_sampler

    from charlm_jax import generate

    sampler = make_sampler()
    chunks = []
    real_stream = sampler.stream

    def recording_stream(*args, **kwargs):
        for pieces in real_stream(*args, **kwargs):
            chunks.append(pieces[0])
            yield pieces

    monkeypatch.setattr(sampler, "stream", recording_stream)
    lines = iter(["abc", "quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 40, "seed": 0}
    generate.interactive(sampler, settings)
    assert [len(c) for c in chunks] == [16, 16, 8]  # printed as each chunk arrives
    assert "abc" + "".join(chunks) in capsys.readouterr().out


def test_bpe_model_trains_and_samples(tmp_path, capfd):
    text = tmp_path / "text.txt"
    text.write_text("ROMEO: to be or not to be, café\nJULIET: that is the question\n" * 50)
    config = tiny_config(
        **{"data.path": str(text), "data.tokenizer": "bpe", "data.vocab_size": 60,
           "train.num_steps": 20, "data.context_length": 16},
    )  # fmt: skip
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["tokenizer"] == "bpe" and summary["vocab_size"] == 60
    ratio = summary["val_chars_per_token"]
    assert ratio > 2  # nats per token over characters per token: bits per character
    assert summary["best_val_bpc"] == pytest.approx(summary["best_val_loss"] / np.log(2) / ratio)
    result = generate_in_process(
        capfd, f"--workdir={tmp_path / 'run'}", "--prompt=JULIET: é", "--num_samples=2",
        "--max_new_tokens=20", "--temperature=0.8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("JULIET: é") for s in samples)
    assert all(len(s) > len("JULIET: é") + 20 for s in samples)  # 20 tokens of 1+ characters
    assert_one_line_error(
        generate_in_process(capfd, f"--workdir={tmp_path / 'run'}", "--prompt=Zed"),
        "error: unknown character",
    )
