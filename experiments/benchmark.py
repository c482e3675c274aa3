"""Training and decoding speed of a config on the visible devices, with model FLOPs and MFU.

    python experiments/benchmark.py --config=configs/transformer.py:nanogpt_baby
    python experiments/benchmark.py --config=configs/transformer.py:nanogpt --steps=5 \
        --config.train.batch_size=16 --out=bench.json

Train step: the jitted step of `charlm_jax.training.train` (batch drawn on the device,
donated state), compile excluded, timed step by step after warm-up: median, min and max. Model
FLOPs per token are nanoGPT's `estimate_mfu` count: 6 x non-embedding parameters + 12 x
layers x width x context (attention), 6 x parameters for the MLP. MFU divides the achieved
model FLOP/s by a
peak: on CPU a matmul peak measured in this run (2048^3 `jnp.dot` in the compute dtype), on GPU the
device's nominal dense peak for the compute dtype. Decode: tokens/s of `Sampler.generate`
from a 1-character prompt, batch 1 and 16. Weights are random: speed does not depend on them.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import provenance
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from charlm_jax import cli
from charlm_jax.decoding.sampling import Sampler
from charlm_jax.model import models
from charlm_jax.training import parallel, step_bench

config_flags.DEFINE_config_file("config", None, "Config file[:preset].", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed train steps.")
flags.DEFINE_integer("warmup", 3, "Untimed train steps after compiling.")
flags.DEFINE_list("decode_batches", ["1", "16"], "Batch sizes for decode speed ('' to skip).")
flags.DEFINE_integer("decode_tokens", 256, "New tokens per row for decode speed.")
flags.DEFINE_string("out", None, "Also write the results to this JSON file.")
flags.mark_flag_as_required("config")
FLAGS = flags.FLAGS

# Nominal dense peak FLOP/s of one GPU by compute dtype (float32 matmuls run as TF32).
GPU_PEAKS = {
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}


def flops_per_token(config, num_params: int, embedding_params: int) -> float:
    """nanoGPT's model FLOPs per trained token (forward and backward)."""
    m = config.model
    if m.name == "transformer":
        attention = 12 * m.num_layers * m.embedding_dim * config.data.context_length
        return 6 * (num_params - embedding_params) + attention
    return 6 * num_params


def measured_matmul_peak(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` jitted n x n matmuls in `dtype` on one device, times the
    number of processes (a process's CPU devices share its cores)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = min(_timed(lambda: dot(a, a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best * jax.process_count()


def device_peak(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of all devices, where the number comes from)."""
    device = jax.devices()[0]
    if device.platform == "gpu":
        for name, peaks in GPU_PEAKS.items():
            if name in device.device_kind:
                return peaks[dtype] * jax.device_count(), f"nominal {name} {dtype}"
    return measured_matmul_peak(dtype), f"measured {dtype} 2048^3 matmul"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_speed(config) -> dict:
    setup = step_bench.compile_step(config)
    for _ in range(FLAGS.warmup):
        metrics = setup.advance()
    jax.block_until_ready(metrics)
    times = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        jax.block_until_ready(setup.advance())
        times.append(time.perf_counter() - start)

    params = nnx.state(nnx.merge(setup.model_def, setup.model_state), nnx.Param)
    num_params = models.count_params(params)
    # nanoGPT counts the position embedding (wpe) out and keeps the tied token embedding.
    embedding_params = models.count_params(params["pos_embed"]) if "pos_embed" in params else 0
    tc = config.train
    tokens_per_step = tc.batch_size * tc.grad_accum_steps * config.data.context_length
    median = statistics.median(times)
    return {
        "num_params": num_params,
        "tokens_per_step": tokens_per_step,
        "compile_s": setup.compile_s,
        "step_ms": {"median": 1e3 * median, "min": 1e3 * min(times), "max": 1e3 * max(times)},
        "tokens_per_s": tokens_per_step / median,
        "flops_per_token": flops_per_token(config, num_params, embedding_params),
        "model": nnx.merge(setup.model_def, setup.model_state),
        "tokenizer": setup.tokenizer,
    }


def decode_speed(model, tokenizer, context: int, batch: int, new_tokens: int) -> float:
    sampler = Sampler(model, tokenizer, context)
    prompts = ["\n"] * batch
    sampler.generate(prompts, max_new_tokens=new_tokens, seed=0)  # compiles
    seconds = statistics.median(
        _timed(lambda: sampler.generate(prompts, max_new_tokens=new_tokens, seed=0))
        for _ in range(3)
    )
    return batch * new_tokens / seconds


def main(argv: list[str]) -> None:
    del argv
    started = provenance.begin()
    cli.quiet_library_logs()
    config = FLAGS.config
    parallel.one_cpu_device_per_core(config.train.batch_size)  # as training does
    result = train_speed(config)
    peak, peak_source = device_peak(config.model.dtype)
    model_flops = result["flops_per_token"] * result["tokens_per_s"]
    model = result.pop("model")
    tokenizer = result.pop("tokenizer")
    decode = {
        int(b): decode_speed(model, tokenizer, config.data.context_length, int(b),
                             FLAGS.decode_tokens)
        for b in FLAGS.decode_batches if b
    }  # fmt: skip
    report = {
        "config": f"{config.model.name}:{config.get('preset')}",
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        **result,
        "model_tflops_per_s": model_flops / 1e12,
        "peak_tflops_per_s": peak / 1e12,
        "peak_source": peak_source,
        "mfu": model_flops / peak,
        "decode_tokens_per_s": decode,
    }
    step = report["step_ms"]
    rows = [
        ("config", report["config"]),
        ("devices", report["devices"]),
        ("parameters", f"{report['num_params']:,}"),
        ("tokens per step", f"{report['tokens_per_step']:,}"),
        ("compile", f"{report['compile_s']:.1f} s"),
        ("train step", f"{step['median']:.1f} ms (min {step['min']:.1f}, max {step['max']:.1f})"),
        ("train tokens/s", f"{report['tokens_per_s']:,.0f}"),
        ("model FLOPs/token", f"{report['flops_per_token'] / 1e6:.2f} M"),
        ("model TFLOP/s", f"{report['model_tflops_per_s']:.3f}"),
        ("peak TFLOP/s", f"{report['peak_tflops_per_s']:.3f} ({peak_source})"),
        ("MFU", f"{100 * report['mfu']:.1f}%"),
        *((f"decode tokens/s, batch {b}", f"{v:,.0f}") for b, v in decode.items()),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    if FLAGS.out:
        provenance.write_json(FLAGS.out, report, started)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(lambda: FLAGS.config.to_dict()))
