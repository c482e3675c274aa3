"""The jitted train and eval steps, and the loop that drives them.

The steps use Flax's functional pattern: the model and optimizer are split once into a
static graph and a state pytree; each step merges them inside `jax.jit`, computes, and
returns the new state (donated, so it is updated in place). Batches are drawn on the device
from the step's RNG key (`fold_in(seed, step)`), so the host does no per-step work and a
resumed run sees exactly the batches an uninterrupted one would. Corpora kept off the device
(memory-mapped) get the same batches drawn on the host and prefetched
(`batching.PrefetchedBatches`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import itertools
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from clu import parameter_overview
from flax import nnx
from jax.sharding import Mesh

from charlm_jax.data import batching, pipeline
from charlm_jax.data.tokenizers import Tokenizer, load_tokenizer
from charlm_jax.errors import UserError
from charlm_jax.model import models
from charlm_jax.training import optimizers, parallel
from charlm_jax.training.metrics import MetricsLog, TrainMetrics, bits_per_character
from charlm_jax.workdir import checkpoints, layout

LOSS_CURVE_FILE = "loss_curve.png"
PLOTTING = "charlm_jax.training.curves"  # imported only by runs that draw the loss curve


def create_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping, then AdamW, or Muon with AdamW (`train.optimizer`), on a
    linear-warmup schedule (`optimizers.schedule`); returns it with the AdamW learning rate.

    `config` is the `train` section. Weight decay applies to matrices and embeddings only.
    """
    schedule = optimizers.schedule(config, config.learning_rate, config.min_learning_rate)
    if config.optimizer not in optimizers.OPTIMIZERS:
        raise UserError(
            f"unknown train.optimizer {config.optimizer!r}: expected one of {optimizers.OPTIMIZERS}"
        )
    if config.optimizer == "muon":
        update = optimizers.muon_with_adamw(config)
    else:
        update = optimizers.adamw(config, schedule)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), update), schedule


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
    config: ml_collections.ConfigDict,
    on_device: bool = True,
) -> Callable:
    """(model_state, opt_state, batch_data, key) -> (model_state, opt_state, metrics), jitted,
    for `config`'s batch size, sequence length, `train.grad_accum_steps` and
    `train.deterministic`.

    `batch_data` is all the training tokens (`on_device`: the step draws its batch), or the
    step's (inputs, targets), drawn on the host from the same key (`batching.PrefetchedBatches`).
    `shardings` are the (model_state, opt_state) shardings; each batch is split over the
    mesh's data axis. With `grad_accum_steps` k > 1, a step takes k * batch_size windows
    (the same ones a k-times larger batch would), averages their gradients over k
    micro-batches, and makes one update. `deterministic`: bitwise-reproducible steps on GPUs
    (XLA:GPU otherwise adds some gradients up with atomics, in an order that varies from run
    to run), which exact resume needs; it makes GPU steps slower (docs/performance.md).
    No effect on CPUs.
    """
    batch_size, sequence_length = config.train.batch_size, config.data.sequence_length
    grad_accum_steps = config.train.grad_accum_steps

    def loss_and_grads(model_state, inputs, targets, dropout_key):
        def loss_fn(model):
            logits = model(inputs, train=True, rngs=nnx.Rngs(dropout=dropout_key))
            return cross_entropy(logits, targets)

        return nnx.value_and_grad(loss_fn)(nnx.merge(model_def, model_state))

    def train_step(model_state, opt_state, batch_data, key):
        model, opt = nnx.merge(model_def, model_state), nnx.merge(opt_def, opt_state)
        batch_key, dropout_key = batching.step_keys(key, opt.step[...])
        if on_device:
            inputs, targets = batching.sample_batch(
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
        compiler_options={"xla_gpu_deterministic_ops": config.train.deterministic},
    )


def build_training(
    config: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh, on_device: bool = True
) -> tuple[Callable, nnx.GraphDef, nnx.State, nnx.State, optax.Schedule]:
    """Everything `config` trains with: (the jitted train step, model_def, model_state,
    opt_state, the learning-rate schedule), the states laid out on `mesh`."""
    tx, schedule = create_optimizer(config.train)
    model_def, opt_def, model_state, opt_state, shardings = init_train_state(
        config, vocab_size, tx, mesh
    )
    step = make_train_step(model_def, opt_def, shardings, mesh, config, on_device)
    return step, model_def, model_state, opt_state, schedule


def make_eval_step(model_def: nnx.GraphDef, mesh: Mesh) -> Callable:
    """(model_state, (inputs, targets)) -> mean loss over the batches, jitted: the arrays are
    (num_batches, batch_size, sequence_length), each batch split over the mesh's data axis.
    Both splits' batches have the same shape, so it compiles once."""

    def eval_step(model_state, batches):
        model = nnx.merge(model_def, model_state)

        def batch_loss(batch):
            inputs, targets = jax.lax.with_sharding_constraint(batch, parallel.batch_sharding(mesh))
            return cross_entropy(model(inputs), targets)

        return jnp.mean(jax.lax.map(batch_loss, batches))

    return jax.jit(eval_step)


def evals_without_improvement(val_losses: list[float], min_delta: float) -> int:
    """Evaluations since the last one that beat every earlier loss by more than min_delta."""
    best, since = math.inf, 0
    for loss in val_losses:
        if loss < best - min_delta:
            best, since = loss, 0
        else:
            since += 1
    return since


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises UserError for a config that cannot train, before anything is read: a count or
    size below 1, a `model` field no model can be built from (an unknown name, position or
    norm, num_heads not dividing the width, a bad dtype), or a `data` field that is not one
    of its choices."""
    tc = config.train
    sizes = {
        "train.num_steps": tc.num_steps, "train.eval_every": tc.eval_every,
        "train.log_every": tc.log_every, "train.eval_batches": tc.eval_batches,
        "train.batch_size": tc.batch_size, "train.grad_accum_steps": tc.grad_accum_steps,
        "data.sequence_length": config.data.sequence_length,
    }  # fmt: skip
    for name, value in sizes.items():
        if value < 1:
            raise UserError(f"{name} must be positive, got {value}")
    models.check_config(config)
    pipeline.check_config(config.data)


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


@dataclasses.dataclass
class _Run:
    """What the loop's helpers share: the prepared run, and the counts it keeps."""

    config: ml_collections.ConfigDict  # train.num_steps resolved (train.num_epochs)
    workdir: Path
    tokenizer: Tokenizer
    chars_per_token: float
    num_params: int
    start_step: int
    resumed: bool
    train_step: Callable  # compiled: (model_state, opt_state, batch, key) -> (..., metrics)
    evaluate: Callable[[nnx.State], tuple[float, float]]  # -> (train loss, val loss)
    schedule: optax.Schedule
    batches: Iterator  # each step's batch data
    data_key: jax.Array
    manager: ocp.CheckpointManager
    log: MetricsLog
    progress: tqdm.tqdm
    is_main: bool
    train_seconds: float = 0.0  # in train steps (evaluations and saves excluded)
    timed_steps: int = 0
    last_eval: tuple[float | None, float | None] = (None, None)  # (train loss, val loss)

    @property
    def tokens_per_step(self) -> int:
        tc = self.config.train
        return tc.batch_size * tc.grad_accum_steps * self.config.data.sequence_length

    def val_history(self) -> list[float]:
        return [r["val_loss"] for r in self.log.evals()]


def _with_epochs_as_steps(config: ml_collections.ConfigDict, train_tokens: int):
    """`config`, or with `train.num_epochs` > 0 a copy whose `train.num_steps` covers them
    (the learning-rate schedule and the saved config use it)."""
    tc = config.train
    if tc.num_epochs <= 0:
        return config
    config = copy.deepcopy(config)
    tokens_per_step = tc.batch_size * tc.grad_accum_steps * config.data.sequence_length
    steps = config.train.num_steps = max(
        1, math.ceil(tc.num_epochs * train_tokens / tokens_per_step)
    )
    logging.info("%g epochs of %d tokens: %d steps", tc.num_epochs, train_tokens, steps)
    return config


def _batch_source(config, dataset: pipeline.Dataset, mesh, start_step: int, keys):
    """(each step's batch data, the two splits' evaluation batches, the train step's batch
    argument spec), drawn from `keys`, (data key, eval key): the training tokens on the
    devices, or training batches drawn on the host."""
    tc, seq_len = config.train, config.data.sequence_length
    data_key, eval_key = keys
    # The same batches at every evaluation, so successive losses compare.
    eval_batches = [
        jax.tree.map(
            lambda x: parallel.put_replicated(x, mesh),
            batching.eval_batches_numpy(split, eval_key, tc.batch_size, seq_len, tc.eval_batches),
        )
        for split in (dataset.train, dataset.val)
    ]
    if dataset.on_device:
        train_tokens = parallel.put_replicated(np.asarray(dataset.train, np.int32), mesh)
        batches = (train_tokens for _ in itertools.count())  # closable, like PrefetchedBatches
        return batches, eval_batches, train_tokens
    step_batch = tc.batch_size * tc.grad_accum_steps  # windows drawn per step
    batches = batching.PrefetchedBatches(
        dataset.train, data_key, step_batch, seq_len, start_step, parallel.batch_sharding(mesh)
    )
    return batches, eval_batches, (jax.ShapeDtypeStruct((step_batch, seq_len), jnp.int32),) * 2


def _setup(config: ml_collections.ConfigDict, workdir: Path, closing: contextlib.ExitStack):
    """Everything a run needs before its first step, and its states: (_Run, model_state,
    opt_state). A workdir with checkpoints is resumed from its latest readable one. What
    must be closed after the run is entered into `closing`."""
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.train.batch_size, mesh)
    is_main = parallel.is_main_process()
    if is_main:  # for the loss curve at the end: matplotlib takes seconds, XLA's compiles hide it
        threading.Thread(target=importlib.import_module, args=(PLOTTING,), daemon=True).start()
    manager = closing.enter_context(
        checkpoints.open_manager(workdir, keep_latest=max(config.train.keep_checkpoints, 1))
    )  # leaving it waits for background saves to finish
    resuming = bool(manager.all_steps())
    if resuming:
        layout.check_resumable(config, workdir)
    dataset = pipeline.load_dataset(
        config.data, load_tokenizer(workdir / checkpoints.TOKENIZER_FILE) if resuming else None
    )
    config = _with_epochs_as_steps(config, len(dataset.train))
    train_step, model_def, model_state, opt_state, schedule = build_training(
        config, dataset.tokenizer.vocab_size, mesh, dataset.on_device
    )
    num_params = models.count_params(model_state)
    logging.info(
        "Model %s, %s parameters:\n%s", config.model.name, f"{num_params:,}",
        parameter_overview.get_parameter_overview(nnx.to_pure_dict(model_state)),
    )  # fmt: skip
    start_step = 0
    if resuming:
        start_step, model_state, opt_state = checkpoints.restore_latest_good(
            manager, model_state, opt_state
        )
        logging.info("Resuming from step %d in %s", start_step, workdir)
    elif is_main:
        checkpoints.save_run_files(workdir, config, dataset.tokenizer)
    log = MetricsLog(workdir, start_step, read_only=not is_main)
    closing.callback(log.close)
    data_key, eval_key = jax.random.split(jax.random.key(config.train.seed))
    batches, eval_batches, batch_spec = _batch_source(
        config, dataset, mesh, start_step, (data_key, eval_key)
    )
    closing.callback(batches.close)
    train_step = train_step.lower(model_state, opt_state, batch_spec, data_key).compile()
    eval_step = make_eval_step(model_def, mesh)

    def evaluate(state: nnx.State) -> tuple[float, float]:
        losses = [eval_step(state, split) for split in eval_batches]
        return tuple(float(x) for x in jax.device_get(losses))

    # A progress bar on a terminal; log lines otherwise (files, CI).
    progress = tqdm.tqdm(
        total=config.train.num_steps, initial=start_step, unit="step",
        disable=not (is_main and sys.stderr.isatty()),
    )  # fmt: skip
    closing.callback(progress.close)
    run = _Run(
        config, workdir, dataset.tokenizer, dataset.chars_per_token, num_params,
        start_step, resuming, train_step, evaluate, schedule, batches, data_key, manager, log,
        progress, is_main,
    )  # fmt: skip
    return run, model_state, opt_state


def _log_interval(run: _Run, step: int, pending: list, tick: float) -> None:
    """Averages the metrics of the steps since the last log (fetching them is the loop's only
    host sync between logs), times those steps (since `tick`), and logs them."""
    tc = run.config.train
    fetched = jax.device_get(pending)
    run.train_seconds += time.perf_counter() - tick
    run.timed_steps += len(pending)
    averaged = TrainMetrics.empty()
    for m in fetched:
        averaged = averaged.merge(m)
    values = {k: float(v) for k, v in averaged.compute().items()}
    if not math.isfinite(values["loss"]):
        raise UserError(
            f"training diverged: loss is {values['loss']} by step {step}; the last "
            f"good checkpoint is step {run.manager.latest_step()}. Lower "
            "train.learning_rate or raise train.warmup_steps"
        )
    step_time = run.train_seconds / run.timed_steps
    values.update(
        lr=float(run.schedule(step - 1)), tokens_per_sec=run.tokens_per_step / step_time,
        tokens=step * run.tokens_per_step,
    )  # fmt: skip
    run.log.write(step, "train", **values)
    if run.progress.disable and run.is_main:
        logging.info(
            "step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.0f tok/s  ETA %s",
            step, tc.num_steps, values["loss"], values["grad_norm"], values["lr"],
            values["tokens_per_sec"], _format_duration((tc.num_steps - step) * step_time),
        )  # fmt: skip
    else:
        run.progress.update(step - run.progress.n)
        run.progress.set_postfix_str(
            f"loss {values['loss']:.4f}  {values['tokens_per_sec']:,.0f} tok/s"
        )


def _evaluate_and_checkpoint(run: _Run, step: int, model_state, opt_state) -> None:
    """Evaluates both splits, saves a checkpoint (kept if it is the best), and logs."""
    train_loss, val_loss = run.last_eval = run.evaluate(model_state)
    checkpoints.save(run.manager, step, model_state, opt_state, val_loss)
    run.log.write(
        step, "eval", train_loss=train_loss, val_loss=val_loss,
        val_bpc=bits_per_character(val_loss, run.chars_per_token),
        tokens=step * run.tokens_per_step,
    )  # fmt: skip
    logging.info(
        "eval step %d: train loss %.4f  val loss %.4f  (best %.4f)",
        step, train_loss, val_loss, min(run.val_history()),
    )  # fmt: skip


def _plot_loss_curve(run: _Run) -> None:
    """DIR/loss_curve.png, drawn once at the end (`python -m charlm_jax.plot DIR` draws it
    during a run). The module was imported in the background by `_setup`."""
    plotting = importlib.import_module(PLOTTING)  # waits for that import to finish
    plotting.plot_loss_curve(run.log.history, run.workdir / LOSS_CURVE_FILE, str(run.workdir))


def _early_stop(train_config: ml_collections.ConfigDict, val_history: list[float]) -> str | None:
    """The stop reason once `early_stopping_patience` evaluations have not improved."""
    patience, min_delta = (
        train_config.early_stopping_patience,
        train_config.early_stopping_min_delta,
    )
    stale = evals_without_improvement(val_history, min_delta)
    if patience > 0 and stale >= patience:
        return f"early stopping: no val loss improvement > {min_delta:g} in {stale} evaluations"
    return None


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    stop: Callable[[], str | None] = lambda: None,
) -> dict:
    """Trains the configured model, evaluating and checkpointing every `train.eval_every`
    steps, and returns (and writes to DIR/summary.json) a summary of the run.

    A workdir that already holds checkpoints of the same model is resumed from its latest
    readable one, exactly: batches and dropout derive from (seed, step). `stop()` is asked
    after every step; once it gives a reason, the run evaluates, checkpoints and stops with
    that reason (the CLI's signals: `cli.StopSignals`).
    """
    wall_start = time.perf_counter()
    validate(config)
    with contextlib.ExitStack() as closing:
        workdir = layout.prepare(workdir)
        closing.enter_context(layout.locked(workdir))
        run, model_state, opt_state = _setup(config, workdir, closing)
        tc, step, pending, stop_reason = run.config.train, run.start_step, [], None
        logging.info("Training %d steps of %d tokens from step %d",
                     tc.num_steps, run.tokens_per_step, step)  # fmt: skip
        tick = time.perf_counter()
        while step < tc.num_steps and stop_reason is None:
            model_state, opt_state, metrics = run.train_step(
                model_state, opt_state, next(run.batches), run.data_key
            )
            step, interrupted = step + 1, stop()
            pending.append(metrics)
            is_eval = step % tc.eval_every == 0 or step == tc.num_steps or interrupted
            is_checkpoint = tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0
            if not (is_eval or is_checkpoint or step % tc.log_every == 0):
                continue
            _log_interval(run, step, pending, tick)
            pending = []
            if is_eval:
                _evaluate_and_checkpoint(run, step, model_state, opt_state)
                stop_reason = interrupted or _early_stop(tc, run.val_history())
            elif is_checkpoint:
                checkpoints.save(run.manager, step, model_state, opt_state)
            tick = time.perf_counter()
        if run.is_main:  # while the last checkpoint is written
            _plot_loss_curve(run)
    summary = _summary(run, step, stop_reason or "num_steps", time.perf_counter() - wall_start)
    if run.is_main:
        layout.write_summary(run.workdir, summary)
    logging.info("Done (%s): %s", summary["stop_reason"],
                 {k: v for k, v in summary.items() if k != "history"})  # fmt: skip
    return summary


def _summary(run: _Run, steps: int, stop_reason: str, wall_time_s: float) -> dict:
    """The run's summary.json: what was trained, how it went, and how fast."""
    best_val = min((v for v in run.val_history() if math.isfinite(v)), default=None)
    timed = run.timed_steps
    return {
        "model": run.config.model.name,
        "preset": run.config.get("preset"),
        "num_params": run.num_params,
        "steps": steps,
        "stop_reason": stop_reason,
        "resumed_from_step": run.start_step if run.resumed else None,
        "tokens_per_step": run.tokens_per_step,
        "final_train_loss": run.last_eval[0],
        "final_val_loss": run.last_eval[1],
        "best_val_loss": best_val,
        "best_val_bpc": None
        if best_val is None
        else bits_per_character(best_val, run.chars_per_token),
        "tokenizer": run.tokenizer.kind,
        "vocab_size": run.tokenizer.vocab_size,
        "val_chars_per_token": run.chars_per_token,
        "train_tokens_per_sec": run.tokens_per_step * timed / run.train_seconds if timed else None,
        "step_time_ms": 1000 * run.train_seconds / timed if timed else None,
        "wall_time_s": wall_time_s,
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "peak_device_memory_bytes": (jax.local_devices()[0].memory_stats() or {}).get(
            "peak_bytes_in_use"
        ),  # None where the device does not report it (CPU)
        "history": run.log.evals(),
    }
