"""The jitted train and eval steps, and the loop that drives them.

The steps use Flax's functional pattern: the model and optimizer are split once into a
static graph and a state pytree; each step merges them inside `jax.jit`, computes, and
returns the new state (donated, so it is updated in place). Batches are drawn on the device
from the step's RNG key (`fold_in(seed, step)`), so the host does no per-step work and a
resumed run sees exactly the batches an uninterrupted one would. Corpora kept off the device
(memory-mapped) get the same batches drawn on the host and prefetched (`data.HostBatches`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from clu import parameter_overview
from flax import nnx
from jax.sharding import Mesh

from charlm_jax import checkpoints, data, models, parallel, plotting
from charlm_jax.errors import UserError
from charlm_jax.metrics import MetricsLog, TrainMetrics, bits_per_character
from charlm_jax.tokenizers import create_tokenizer, load_tokenizer

LOSS_CURVE_FILE = "loss_curve.png"

# Fields that must match to resume from a workdir's checkpoints (the state's shapes).
RESUME_FIELDS = ("model.", "data.sequence_length")
RESUME_FREE = ("model.dtype", "model.remat")  # how the model computes, not what it holds


def create_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and a linear-warmup, cosine-decay schedule.

    `config` is the `train` section. Weight decay applies to matrices and embeddings only.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_steps, config.warmup_steps + 1),
        end_value=config.min_learning_rate,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            schedule,
            b1=config.beta1,
            b2=config.beta2,
            weight_decay=config.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        ),
    )
    return tx, schedule


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets
    ).mean()


def init_train_state(
    config: ml_collections.ConfigDict,
    vocab_size: int,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[nnx.GraphDef, nnx.GraphDef, nnx.State, nnx.State, tuple]:
    """The model and optimizer, split: (model_def, opt_def, model_state, opt_state,
    shardings of the two states). The states are created on the devices, already laid out
    as they will be trained (replicated, or split with `train.fsdp`)."""

    def init() -> tuple[nnx.Module, nnx.Optimizer]:
        model = models.create_model(config, vocab_size, nnx.Rngs(config.train.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    abstract_model, abstract_opt = nnx.eval_shape(init)
    model_def, abstract_model_state = nnx.split(abstract_model)
    opt_def, abstract_opt_state = nnx.split(abstract_opt)
    shardings = parallel.state_shardings(
        (abstract_model_state, abstract_opt_state), mesh, config.train.fsdp
    )
    model_state, opt_state = jax.jit(
        lambda: tuple(nnx.state(part) for part in init()), out_shardings=shardings
    )()
    return model_def, opt_def, model_state, opt_state, shardings


def make_train_step(
    model_def: nnx.GraphDef,
    opt_def: nnx.GraphDef,
    shardings: tuple,
    mesh: Mesh,
    batch_size: int,
    sequence_length: int,
    grad_accum_steps: int = 1,
    on_device: bool = True,
    deterministic: bool = True,
) -> Callable:
    """(model_state, opt_state, batch_data, key) -> (model_state, opt_state, metrics), jitted.

    `batch_data` is all the training tokens (`on_device`: the step draws its batch), or the
    step's (inputs, targets), drawn on the host from the same key (`data.HostBatches`).
    `shardings` are the (model_state, opt_state) shardings; each batch is split over the
    mesh's data axis. With `grad_accum_steps` k > 1, a step takes k * batch_size windows
    (the same ones a k-times larger batch would), averages their gradients over k
    micro-batches, and makes one update. `deterministic`: bitwise-reproducible steps on GPUs
    (XLA:GPU otherwise adds some gradients up with atomics, in an order that varies from run
    to run), which exact resume needs; the nanogpt step on an H200 costs 13.4 -> 18.0 ms.
    No effect on CPUs.
    """

    def loss_and_grads(model_state, inputs, targets, dropout_key):
        def loss_fn(model):
            logits = model(inputs, train=True, rngs=nnx.Rngs(dropout=dropout_key))
            return cross_entropy(logits, targets)

        return nnx.value_and_grad(loss_fn)(nnx.merge(model_def, model_state))

    def train_step(model_state, opt_state, batch_data, key):
        model, opt = nnx.merge(model_def, model_state), nnx.merge(opt_def, opt_state)
        batch_key, dropout_key = data.step_keys(key, opt.step[...])
        if on_device:
            inputs, targets = data.sample_batch(
                batch_data, batch_key, grad_accum_steps * batch_size, sequence_length
            )
        else:
            inputs, targets = batch_data
        if grad_accum_steps == 1:
            inputs, targets = jax.lax.with_sharding_constraint(
                (inputs, targets), parallel.batch_sharding(mesh)
            )
            loss, grads = loss_and_grads(model_state, inputs, targets, dropout_key)
        else:
            micro = jax.lax.with_sharding_constraint(
                jax.tree.map(lambda x: x.reshape(grad_accum_steps, batch_size, -1),
                             (inputs, targets)),
                parallel.batch_sharding(mesh, leading_dims=1),
            )  # fmt: skip

            def accumulate(carry, i_batch):
                state, total = carry  # the state rides along: NNX objects can't be closed over
                i, (x, y) = i_batch
                loss_grads = loss_and_grads(state, x, y, jax.random.fold_in(dropout_key, i))
                return (state, jax.tree.map(jnp.add, total, loss_grads)), None

            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(loss_and_grads, model_state, micro[0][0], micro[1][0], dropout_key),
            )
            (_, total), _ = jax.lax.scan(
                accumulate, (model_state, zeros), (jnp.arange(grad_accum_steps), micro)
            )
            loss, grads = jax.tree.map(lambda t: t / grad_accum_steps, total)
        opt.update(model, grads)
        metrics = TrainMetrics.single_from_model_output(loss=loss, grad_norm=optax.tree.norm(grads))
        return nnx.state(model), nnx.state(opt), metrics

    model_sh, opt_sh = shardings
    replicated = parallel.replicated(mesh)
    batch_sh = replicated if on_device else parallel.batch_sharding(mesh)
    return jax.jit(
        train_step,
        in_shardings=(model_sh, opt_sh, batch_sh, replicated),
        out_shardings=(model_sh, opt_sh, replicated),
        donate_argnums=(0, 1),
        compiler_options={"xla_gpu_deterministic_ops": deterministic},
    )


def build_training(
    config: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh, on_device: bool = True
) -> tuple[Callable, nnx.GraphDef, nnx.State, nnx.State, optax.Schedule]:
    """Everything `config` trains with: (the jitted train step, model_def, model_state,
    opt_state, the learning-rate schedule), the states laid out on `mesh`."""
    tc = config.train
    tx, schedule = create_optimizer(tc)
    model_def, opt_def, model_state, opt_state, shardings = init_train_state(
        config, vocab_size, tx, mesh
    )
    step = make_train_step(
        model_def, opt_def, shardings, mesh, tc.batch_size, config.data.sequence_length,
        tc.grad_accum_steps, on_device, tc.deterministic,
    )  # fmt: skip
    return step, model_def, model_state, opt_state, schedule


def make_eval_step(
    model_def: nnx.GraphDef,
    mesh: Mesh,
    batch_size: int,
    sequence_length: int,
    num_batches: int,
    on_device: bool = True,
) -> Callable:
    """(model_state, batch_data, key) -> mean loss over `num_batches` random batches, jitted;
    each batch is split over the mesh's data axis.

    `batch_data` is a split's tokens (`on_device`), or its batches drawn on the host
    (`data.host_batches`, the same batches).
    """

    def eval_step(model_state, batch_data, key):
        model = nnx.merge(model_def, model_state)

        def batch_loss(i):
            if on_device:
                batch = data.sample_batch(
                    batch_data, jax.random.fold_in(key, i), batch_size, sequence_length
                )
            else:
                batch = batch_data[0][i], batch_data[1][i]
            inputs, targets = jax.lax.with_sharding_constraint(batch, parallel.batch_sharding(mesh))
            return cross_entropy(model(inputs), targets)

        return jnp.mean(jax.lax.map(batch_loss, jnp.arange(num_batches)))

    return jax.jit(eval_step)


def _prepare_workdir(workdir: str | Path) -> Path:
    if not str(workdir):
        raise UserError("--workdir is empty")
    workdir = Path(workdir).expanduser()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
    return workdir


def _flat(config: ml_collections.ConfigDict) -> dict:
    """{"model.num_layers": 4, ...} for every leaf field."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            flat[key] = value
    return flat


def _check_resumable(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict, workdir):
    now, there = _flat(config), _flat(saved)
    differing = [
        f"{name}: {there.get(name)!r} there, {now.get(name)!r} now"
        for name in sorted(set(now) | set(there))
        if name.startswith(RESUME_FIELDS)
        and name not in RESUME_FREE
        and now.get(name) != there.get(name)
    ]
    if differing:
        raise UserError(
            f"workdir {workdir} holds checkpoints of a different model ({'; '.join(differing)}); "
            "use a new --workdir, or the same config to resume"
        )


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class _StopSignals:
    """While active, SIGINT and SIGTERM ask the loop to checkpoint and stop; a second one
    stops at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint, then stopping", self.received)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def evals_without_improvement(val_losses: list[float], min_delta: float) -> int:
    """Evaluations since the last one that beat every earlier loss by more than min_delta."""
    best, since = math.inf, 0
    for loss in val_losses:
        if loss < best - min_delta:
            best, since = loss, 0
        else:
            since += 1
    return since


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains the configured model, evaluating and checkpointing every `train.eval_every`
    steps, and returns (and writes to DIR/summary.json) a summary of the run.

    A workdir that already holds checkpoints of the same model is resumed from its latest
    readable one, exactly: batches and dropout derive from (seed, step).
    """
    wall_start = time.perf_counter()
    workdir = _prepare_workdir(workdir)
    tc = config.train
    batch_size, seq_len = tc.batch_size, config.data.sequence_length
    tokens_per_step = batch_size * tc.grad_accum_steps * seq_len
    positive = (tc.num_steps, tc.eval_every, tc.log_every, tc.eval_batches, batch_size, seq_len,
                tc.grad_accum_steps)  # fmt: skip
    if min(positive) < 1:
        raise UserError(
            "train.num_steps, train.eval_every, train.log_every, train.eval_batches, "
            "train.batch_size, train.grad_accum_steps and data.sequence_length must all be "
            "positive"
        )
    mesh = parallel.make_mesh()
    parallel.check_batch_size(batch_size, mesh)
    is_main = parallel.is_main_process()

    manager = checkpoints.open_manager(workdir, keep_latest=max(tc.keep_checkpoints, 1))
    resuming = bool(manager.all_steps())
    corpus = data.open_corpus(config.data)
    if resuming:
        _check_resumable(config, checkpoints.load_config(workdir), workdir)
        tokenizer = load_tokenizer(workdir / checkpoints.TOKENIZER_FILE)
    else:
        train_part = corpus.chunks(1.0 - config.data.val_fraction)
        tokenizer = create_tokenizer(config.data, corpus.chunks(), train_part)
    tokens = corpus.tokens(tokenizer)
    train_np, val_np = data.split_tokens(tokens, config.data.val_fraction, seq_len)
    chars_per_token = data.chars_per_token(tokenizer, val_np)
    on_device = data.batches_on_device(config.data, tokens)
    if tc.num_epochs > 0:
        tc.num_steps = max(1, math.ceil(tc.num_epochs * len(train_np) / tokens_per_step))
        logging.info("%g epochs of %d tokens: %d steps", tc.num_epochs, len(train_np), tc.num_steps)

    train_step, model_def, model_state, opt_state, schedule = build_training(
        config, tokenizer.vocab_size, mesh, on_device
    )
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(model_state))
    logging.info(
        "Model %s, %s parameters:\n%s",
        config.model.name,
        f"{num_params:,}",
        parameter_overview.get_parameter_overview(nnx.to_pure_dict(model_state)),
    )

    if resuming:
        start_step, model_state, opt_state = checkpoints.restore_latest_good(
            manager, model_state, opt_state
        )
        logging.info("Resuming from step %d in %s", start_step, workdir)
    else:
        if is_main:
            checkpoints.save_run_files(workdir, config, tokenizer)
        start_step = 0
    log = MetricsLog(workdir, start_step, read_only=not is_main)
    val_history = [r["val_loss"] for r in log.evals()]
    best_val = min(val_history, default=math.inf)

    key = jax.random.key(tc.seed)
    data_key, eval_key = jax.random.split(key)
    step_batch = batch_size * tc.grad_accum_steps  # windows drawn per step
    if on_device:
        train_tokens, val_tokens = (
            parallel.put_replicated(np.asarray(t, np.int32), mesh) for t in (train_np, val_np)
        )
        eval_data = (train_tokens, val_tokens)
        batches = (train_tokens for _ in itertools.count())  # closable, like HostBatches
        batch_spec = train_tokens
    else:
        eval_data = [
            data.host_batches(t, eval_key, batch_size, seq_len, tc.eval_batches)
            for t in (train_np, val_np)
        ]
        batches = data.HostBatches(
            train_np, data_key, step_batch, seq_len, start_step, parallel.batch_sharding(mesh)
        )
        batch_spec = (jax.ShapeDtypeStruct((step_batch, seq_len), jnp.int32),) * 2
    train_step = train_step.lower(model_state, opt_state, batch_spec, data_key).compile()
    eval_step = make_eval_step(model_def, mesh, batch_size, seq_len, tc.eval_batches, on_device)

    def evaluate(state) -> tuple[float, float]:
        # The same batches at every evaluation, so successive losses compare.
        losses = [eval_step(state, split, eval_key) for split in eval_data]
        return tuple(float(x) for x in jax.device_get(losses))

    train_seconds, timed_steps = 0.0, 0
    train_loss = val_loss = None
    stop_reason = "num_steps"
    step, pending = start_step, []
    logging.info("Training %d steps of %d tokens from step %d", tc.num_steps, tokens_per_step, step)
    # A progress bar on a terminal; log lines otherwise (files, CI).
    progress = tqdm.tqdm(
        total=tc.num_steps, initial=step, unit="step", disable=not (is_main and sys.stderr.isatty())
    )
    # Leaving the block, also on an error, waits for background checkpoint saves to finish.
    with (
        progress,
        _StopSignals() as signals,
        manager,
        contextlib.closing(log),
        contextlib.closing(batches),
    ):
        tick = time.perf_counter()
        while step < tc.num_steps:
            model_state, opt_state, metrics = train_step(
                model_state, opt_state, next(batches), data_key
            )
            step += 1
            pending.append(metrics)
            is_eval = step % tc.eval_every == 0 or step == tc.num_steps or signals.received
            is_checkpoint = tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0
            if not (is_eval or is_checkpoint or step % tc.log_every == 0):
                continue
            fetched = jax.device_get(pending)  # the only host sync between log intervals
            train_seconds += time.perf_counter() - tick
            timed_steps += len(pending)
            pending = []
            averaged = TrainMetrics.empty()
            for m in fetched:
                averaged = averaged.merge(m)
            values = {k: float(v) for k, v in averaged.compute().items()}
            if not math.isfinite(values["loss"]):
                raise UserError(
                    f"training diverged: loss is {values['loss']} by step {step}; the last "
                    f"good checkpoint is step {manager.latest_step()}. Lower "
                    "train.learning_rate or raise train.warmup_steps"
                )
            step_time = train_seconds / timed_steps
            values.update(
                lr=float(schedule(step - 1)), tokens_per_sec=tokens_per_step / step_time,
                tokens=step * tokens_per_step,
            )  # fmt: skip
            log.write(step, "train", **values)
            if progress.disable and is_main:
                logging.info(
                    "step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.0f tok/s  ETA %s",
                    step, tc.num_steps, values["loss"], values["grad_norm"], values["lr"],
                    values["tokens_per_sec"], _format_duration((tc.num_steps - step) * step_time),
                )  # fmt: skip
            else:
                progress.update(step - progress.n)
                progress.set_postfix_str(
                    f"loss {values['loss']:.4f}  {values['tokens_per_sec']:,.0f} tok/s"
                )
            if is_eval:
                train_loss, val_loss = evaluate(model_state)
                best_val = min(best_val, val_loss)
                val_history.append(val_loss)
                checkpoints.save(manager, step, model_state, opt_state, val_loss)
                log.write(
                    step, "eval", train_loss=train_loss, val_loss=val_loss,
                    val_bpc=bits_per_character(val_loss, chars_per_token),
                    tokens=step * tokens_per_step,
                )  # fmt: skip
                if is_main:
                    plotting.plot_loss_curve(log.history, workdir / LOSS_CURVE_FILE, str(workdir))
                logging.info(
                    "eval step %d: train loss %.4f  val loss %.4f  (best %.4f)",
                    step, train_loss, val_loss, best_val,
                )  # fmt: skip
                patience = tc.early_stopping_patience
                stale = evals_without_improvement(val_history, tc.early_stopping_min_delta)
                if signals.received:
                    stop_reason = f"interrupted by {signals.received}"
                    break
                if patience > 0 and stale >= patience:
                    stop_reason = (
                        f"early stopping: no val loss improvement > "
                        f"{tc.early_stopping_min_delta:g} in {stale} evaluations"
                    )
                    break
            elif is_checkpoint:
                checkpoints.save(manager, step, model_state, opt_state)
            tick = time.perf_counter()

    summary = {
        "model": config.model.name,
        "preset": config.get("preset"),
        "num_params": num_params,
        "steps": step,
        "stop_reason": stop_reason,
        "resumed_from_step": start_step if resuming else None,
        "tokens_per_step": tokens_per_step,
        "final_train_loss": train_loss,
        "final_val_loss": val_loss,
        "best_val_loss": best_val if math.isfinite(best_val) else None,
        "best_val_bpc": bits_per_character(best_val, chars_per_token)
        if math.isfinite(best_val)
        else None,
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "val_chars_per_token": chars_per_token,
        "train_tokens_per_sec": tokens_per_step * timed_steps / train_seconds
        if timed_steps
        else None,
        "step_time_ms": 1000 * train_seconds / timed_steps if timed_steps else None,
        "wall_time_s": time.perf_counter() - wall_start,
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "peak_device_memory_bytes": (jax.local_devices()[0].memory_stats() or {}).get(
            "peak_bytes_in_use"
        ),  # None where the device does not report it (CPU)
        "history": log.evals(),
    }
    if is_main:
        summary_path = workdir / checkpoints.SUMMARY_FILE
        tmp = summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, summary_path)
    logging.info("Done (%s): %s", stop_reason,
                 {k: v for k, v in summary.items() if k != "history"})  # fmt: skip
    return summary
