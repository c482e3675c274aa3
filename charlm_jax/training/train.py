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

import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
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
BUDGET_TIMING_STEPS = 10  # steps timed, after the first, to fit the schedule to a time budget
COUNTS = (  # `train` fields that must be at least 1
    "num_steps",
    "eval_every",
    "log_every",
    "eval_batches",
    "batch_size",
    "grad_accum_steps",
)


def create_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformationExtraArgs, Callable]:
    """Global-norm clipping, then AdamW, or Muon with AdamW (`train.optimizer`), scaled by the
    learning-rate schedule (`optimizers.schedule`); returns it with the AdamW learning rate,
    lr(step, num_steps=train.num_steps).

    `config` is the `train` section. Its `update` takes `lr_factor=lr(step, num_steps) /
    train.learning_rate` (the train step passes it); it is checked by
    `optimizers.check_config`. Weight decay applies to matrices and
    embeddings only.
    """
    schedule = optimizers.schedule(config, config.learning_rate, config.min_learning_rate)
    if config.optimizer == "muon":
        update = optimizers.muon_with_adamw(config)
    else:
        update = optimizers.adamw(config, config.learning_rate)
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm), update, optimizers.scale_by_schedule()
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
    config: ml_collections.ConfigDict,
    on_device: bool = True,
) -> Callable:
    """(model_state, opt_state, batch_data, key, num_steps) -> (model_state, opt_state,
    metrics), jitted, for `config`'s batch size, sequence length, `train.grad_accum_steps`
    and `train.deterministic`.

    `batch_data` is all the training tokens (`on_device`: the step draws its batch), or the
    step's (inputs, targets), drawn on the host from the same key (`batching.PrefetchedBatches`).
    `num_steps` (an int32 scalar) is the run's length for the learning-rate schedule, which
    the step computes: `train.num_steps`, or a time budget's estimate, set without
    recompiling. `shardings` are the (model_state, opt_state) shardings; each batch is split
    over the mesh's data axis. With `grad_accum_steps` k > 1, a step takes k * batch_size
    windows (the same ones a k-times larger batch would), averages their gradients over k
    micro-batches, and makes one update. `deterministic`: bitwise-reproducible steps on GPUs
    (XLA:GPU otherwise adds some gradients up with atomics, in an order that varies from run
    to run), which exact resume needs; it makes GPU steps slower (docs/performance.md).
    No effect on CPUs.
    """
    batch_size, context_length = config.train.batch_size, config.data.context_length
    grad_accum_steps = config.train.grad_accum_steps
    peak = config.train.learning_rate  # the rate the optimizers run at, scaled by the schedule
    schedule = optimizers.schedule(config.train, peak, config.train.min_learning_rate)

    def loss_and_grads(model_state, inputs, targets, dropout_key):
        def loss_fn(model):
            logits = model(inputs, train=True, rngs=nnx.Rngs(dropout=dropout_key))
            return cross_entropy(logits, targets)

        return nnx.value_and_grad(loss_fn)(nnx.merge(model_def, model_state))

    def train_step(model_state, opt_state, batch_data, key, num_steps):
        model, opt = nnx.merge(model_def, model_state), nnx.merge(opt_def, opt_state)
        batch_key, dropout_key = batching.step_keys(key, opt.step[...])
        if on_device:
            inputs, targets = batching.sample_batch(
                batch_data, batch_key, grad_accum_steps * batch_size, context_length
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
        lr = schedule(opt.step[...], num_steps)
        opt.update(model, grads, lr_factor=lr / peak if peak else jnp.zeros_like(lr))
        metrics = TrainMetrics.single_from_model_output(
            loss=loss, grad_norm=optax.tree.norm(grads), lr=lr
        )
        return nnx.state(model), nnx.state(opt), metrics

    model_sh, opt_sh = shardings
    replicated = parallel.replicated(mesh)
    batch_sh = replicated if on_device else parallel.batch_sharding(mesh)
    return jax.jit(
        train_step,
        in_shardings=(model_sh, opt_sh, batch_sh, replicated, replicated),
        out_shardings=(model_sh, opt_sh, replicated),
        donate_argnums=(0, 1),
        compiler_options={"xla_gpu_deterministic_ops": config.train.deterministic},
    )


def build_training(
    config: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh, on_device: bool = True
) -> tuple[Callable, nnx.GraphDef, nnx.State, nnx.State, Callable]:
    """Everything `config` trains with: (the jitted train step, model_def, model_state,
    opt_state, the learning-rate schedule), the states laid out on `mesh`."""
    tx, schedule = create_optimizer(config.train)
    model_def, opt_def, model_state, opt_state, shardings = init_train_state(
        config, vocab_size, tx, mesh
    )
    step = make_train_step(model_def, opt_def, shardings, mesh, config, on_device)
    return step, model_def, model_state, opt_state, schedule


def make_eval_step(model_def: nnx.GraphDef, mesh: Mesh) -> Callable:
    """(model_state, (inputs, targets)) -> the mean loss over the batches, jitted: the arrays
    are (..., num_batches, batch_size, context_length), each batch split over the mesh's
    data axis; a loss per leading index (e.g. both splits' batches stacked: one call
    evaluates both)."""

    def eval_step(model_state, batches):
        model = nnx.merge(model_def, model_state)

        def batch_loss(batch):
            inputs, targets = jax.lax.with_sharding_constraint(batch, parallel.batch_sharding(mesh))
            return cross_entropy(model(inputs), targets)

        shape = batches[0].shape[:-2]  # (..., num_batches)
        flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[-2:]), batches)
        return jnp.mean(jax.lax.map(batch_loss, flat).reshape(shape), axis=-1)

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
    """Raises UserError naming the first field of `config` that cannot train, before anything
    is read: one check per section (`models.check_config`, `pipeline.check_config`, and the
    `train` section's counts and `optimizers.check_config`)."""
    models.check_config(config)
    pipeline.check_config(config.data)
    tc = config.train
    for name in COUNTS:
        if tc[name] < 1:
            raise UserError(f"train.{name} must be positive, got {tc[name]}")
    if tc.time_budget_s < 0:
        raise UserError(f"train.time_budget_s must be >= 0 (0: no budget), got {tc.time_budget_s}")
    optimizers.check_config(tc)


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


@dataclasses.dataclass(kw_only=True)
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
        return tc.batch_size * tc.grad_accum_steps * self.config.data.context_length

    def val_history(self) -> list[float]:
        return [r["val_loss"] for r in self.log.evals()]


def _with_epochs_as_steps(config: ml_collections.ConfigDict, train_tokens: int):
    """`config`, or with `train.num_epochs` > 0 a copy whose `train.num_steps` covers them
    (the learning-rate schedule and the saved config use it)."""
    tc = config.train
    if tc.num_epochs <= 0:
        return config
    config = copy.deepcopy(config)
    tokens_per_step = tc.batch_size * tc.grad_accum_steps * config.data.context_length
    steps = config.train.num_steps = max(
        1, math.ceil(tc.num_epochs * train_tokens / tokens_per_step)
    )
    logging.info("%g epochs of %d tokens: %d steps", tc.num_epochs, train_tokens, steps)
    return config


def _batch_source(config, dataset: pipeline.Dataset, mesh, start_step: int, keys):
    """(each step's batch data, the evaluation batches, the train step's batch argument
    spec), drawn from `keys`, (data key, eval key): the training tokens on the devices, or
    training batches drawn on the host. The evaluation batches are both splits' stacked
    (train, val), on the devices: the same batches at every evaluation, so successive
    losses compare."""
    tc, seq_len = config.train, config.data.context_length
    data_key, eval_key = keys
    splits = [
        batching.eval_batches_numpy(split, eval_key, tc.batch_size, seq_len, tc.eval_batches)
        for split in (dataset.train, dataset.val)
    ]
    eval_batches = jax.tree.map(lambda *x: parallel.put_replicated(np.stack(x), mesh), *splits)
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
    train_step, model_def, model_state, opt_state, _ = build_training(
        config, dataset.tokenizer.vocab_size, mesh, dataset.on_device
    )
    num_params = models.count_params(model_state)
    logging.info(
        "Model %s, %s parameters:\n%s",
        config.model.name,
        f"{num_params:,}",
        parameter_overview.get_parameter_overview(nnx.to_pure_dict(model_state)),
    )
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
    num_steps_spec = jax.ShapeDtypeStruct((), jnp.int32)
    # The two programs compile side by side: XLA compiles without holding the GIL.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        compiling = pool.submit(
            lambda: make_eval_step(model_def, mesh).lower(model_state, eval_batches).compile()
        )
        train_step = train_step.lower(
            model_state, opt_state, batch_spec, data_key, num_steps_spec
        ).compile()
        eval_step = compiling.result()

    def evaluate(state: nnx.State) -> tuple[float, float]:
        train_loss, val_loss = jax.device_get(eval_step(state, eval_batches))
        return float(train_loss), float(val_loss)

    # A progress bar on a terminal; log lines otherwise (files, CI).
    progress = tqdm.tqdm(
        total=config.train.num_steps,
        initial=start_step,
        unit="step",
        disable=not (is_main and sys.stderr.isatty()),
    )
    closing.callback(progress.close)
    run = _Run(
        config=config,
        workdir=workdir,
        tokenizer=dataset.tokenizer,
        chars_per_token=dataset.chars_per_token,
        num_params=num_params,
        start_step=start_step,
        resumed=resuming,
        train_step=train_step,
        evaluate=evaluate,
        batches=batches,
        data_key=data_key,
        manager=manager,
        log=log,
        progress=progress,
        is_main=is_main,
    )
    return run, model_state, opt_state


def _log_interval(run: _Run, step: int, pending: list, tick: float, end: int) -> None:
    """Averages the metrics of the steps since the last log (fetching them is the loop's only
    host sync between logs; they are merged on the host), times those steps (since `tick`),
    and logs them; `end` is the run's last step."""
    fetched = jax.device_get(pending)
    run.train_seconds += time.perf_counter() - tick
    run.timed_steps += len(pending)
    values = {
        k: float(v) for k, v in functools.reduce(TrainMetrics.merge, fetched).compute().items()
    }
    if not math.isfinite(values["loss"]):
        raise UserError(
            f"training diverged: loss is {values['loss']} by step {step}; the last "
            f"good checkpoint is step {run.manager.latest_step()}. Lower "
            "train.learning_rate or raise train.warmup_steps"
        )
    step_time = run.train_seconds / run.timed_steps
    values.update(tokens_per_sec=run.tokens_per_step / step_time, tokens=step * run.tokens_per_step)
    run.log.write(step, "train", **values)
    if run.progress.disable and run.is_main:
        logging.info(
            "step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.0f tok/s  ETA %s",
            step, end, values["loss"], values["grad_norm"], values["lr"],
            values["tokens_per_sec"], _format_duration((end - step) * step_time),
        )  # fmt: skip
    else:
        run.progress.update(step - run.progress.n)
        run.progress.set_postfix_str(
            f"loss {values['loss']:.4f}  {values['tokens_per_sec']:,.0f} tok/s"
        )


def _evaluate_and_checkpoint(run: _Run, step: int, model_state, opt_state) -> None:
    """Evaluates both splits, hands a checkpoint (kept if it is the best) to the background
    writer, and logs."""
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


def budget_end_step(step: int, seconds_left: float, step_s: float, eval_s: float,
                    eval_every: int) -> int:  # fmt: skip
    """The last step a time budget reaches from `step`: `seconds_left` holds steps of
    `step_s`, an evaluation and checkpoint of `eval_s` every `eval_every` steps, and the
    final evaluation and checkpoint (reserved as two evaluations: the last write is waited
    for)."""
    per_step = step_s + eval_s / eval_every
    return step + max(0, math.floor((seconds_left - 2 * eval_s) / per_step))


@dataclasses.dataclass
class _Budget:
    """`train.time_budget_s`: times the session's first steps, estimates from them the step
    the budget reaches (which the learning-rate schedule then ends at), and estimates it
    again at each log from the steps since the last estimate: a step's time drifts by 10%
    over minutes on a shared machine, and the schedule follows it."""

    deadline: float  # time.perf_counter() at which the budget is spent
    first_step: int  # the session's
    eval_every: int
    eval_steps: float  # an evaluation and checkpoint's cost in train steps, estimated
    eval_s: float = 0.0  # an evaluation and checkpoint: estimated, then the last one measured
    eval_measured: bool = False
    timing_start: float = 0.0
    step_s: float = 0.0  # the last estimate's step time
    mark: tuple[float, int] = (0.0, 0)  # (train seconds, timed steps) at the last estimate

    def observe(self, step: int, metrics) -> int | None:
        """Called after each step: waits for the steps timed (the first one, a warm-up, is
        not) and, after the last of them, returns the step the budget reaches; else None."""
        if step not in (self.first_step + 1, self.first_step + 1 + BUDGET_TIMING_STEPS):
            return None
        jax.block_until_ready(metrics)
        now = time.perf_counter()
        if step == self.first_step + 1:
            self.timing_start = now
            return None
        end = self._end(step, (now - self.timing_start) / BUDGET_TIMING_STEPS, now)
        logging.info("time budget: %.1f ms per step measured", 1000 * self.step_s)
        return end

    def refit(self, step: int, train_seconds: float, timed_steps: int) -> int | None:
        """At a log, given the run's seconds in train steps and their count: the step the
        budget reaches, from the mean step time since the last estimate (None while fewer
        than BUDGET_TIMING_STEPS steps were timed since, unless the budget is spent)."""
        seconds, steps = train_seconds - self.mark[0], timed_steps - self.mark[1]
        now = time.perf_counter()
        if steps < BUDGET_TIMING_STEPS and now < self.deadline:
            return None
        self.mark = (train_seconds, timed_steps)
        return self._end(step, seconds / steps if steps else self.step_s, now)

    def _end(self, step: int, step_s: float, now: float) -> int:
        self.step_s = step_s
        if not self.eval_measured:
            self.eval_s = self.eval_steps * step_s
        return budget_end_step(step, self.deadline - now, step_s, self.eval_s, self.eval_every)

    def evaluated(self, seconds: float) -> None:
        self.eval_s, self.eval_measured = seconds, True


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
    that reason (the CLI's signals: `cli.StopSignals`). With `train.time_budget_s`, the
    session ends when that many seconds (from this call) are spent, its learning-rate
    schedule fitted to the steps they hold.
    """
    wall_start = time.perf_counter()
    validate(config)
    with contextlib.ExitStack() as closing:
        workdir = layout.prepare(workdir)
        closing.enter_context(layout.locked(workdir))
        run, model_state, opt_state = _setup(config, workdir, closing)
        step, stop_reason, schedule_steps = _train(run, model_state, opt_state, stop, wall_start)
        if run.is_main:  # while the last checkpoint is written
            _plot_loss_curve(run)
    wall_time_s = time.perf_counter() - wall_start
    summary = _summary(run, step, stop_reason, schedule_steps, wall_time_s)
    if run.is_main:
        layout.write_summary(run.workdir, summary)
    logging.info("Done (%s): %s", summary["stop_reason"],
                 {k: v for k, v in summary.items() if k != "history"})  # fmt: skip
    return summary


def _train(run: _Run, model_state, opt_state, stop, started: float) -> tuple[int, str, int]:
    """Steps until `train.num_steps` (or the time budget's end), `stop()` or early stopping,
    logging, evaluating and checkpointing on the way: (the last step, the stop reason, the
    steps the learning-rate schedule spans)."""
    tc, step, pending, stop_reason = run.config.train, run.start_step, [], None
    end = tc.num_steps
    # An evaluation's forward passes, each about a third of a train step's (forward, backward).
    eval_steps = 2 * tc.eval_batches / (3 * tc.grad_accum_steps)
    budget = (
        _Budget(started + tc.time_budget_s, step, tc.eval_every, eval_steps)
        if tc.time_budget_s else None
    )  # fmt: skip
    budget_reason = f"time budget: {tc.time_budget_s:g} s"
    schedule_steps = _step_scalar(run, end)
    logging.info("Training %d steps of %d tokens from step %d",
                 tc.num_steps, run.tokens_per_step, step)  # fmt: skip
    tick = time.perf_counter()
    while step < end and stop_reason is None:
        model_state, opt_state, metrics = parallel.one_step_in_flight(
            run.train_step(model_state, opt_state, next(run.batches), run.data_key, schedule_steps)
        )
        step, interrupted = step + 1, stop()
        pending.append(metrics)
        if budget and (budget_end := budget.observe(step, metrics)) is not None:
            end = run.progress.total = min(tc.num_steps, budget_end)
            schedule_steps = _step_scalar(run, end)
        is_eval = step % tc.eval_every == 0 or step == end or interrupted
        is_checkpoint = tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0
        if not (is_eval or is_checkpoint or step % tc.log_every == 0):
            continue
        _log_interval(run, step, pending, tick, end)
        pending = []
        if budget and (budget_end := budget.refit(step, run.train_seconds, run.timed_steps)):
            end = run.progress.total = min(tc.num_steps, budget_end)
            schedule_steps = _step_scalar(run, end)
            is_eval = is_eval or step == end
        if is_eval:
            evaluated = time.perf_counter()
            _evaluate_and_checkpoint(run, step, model_state, opt_state)
            if budget:
                budget.evaluated(time.perf_counter() - evaluated)
            stop_reason = interrupted or _early_stop(tc, run.val_history())
        elif is_checkpoint:
            checkpoints.save(run.manager, step, model_state, opt_state)
        tick = time.perf_counter()
    if stop_reason is None:
        stop_reason = "num_steps" if end == tc.num_steps else budget_reason
    return step, stop_reason, end


def _step_scalar(run: _Run, value: int) -> jax.Array:
    """`value` as the train step's `num_steps` argument, on its devices (one transfer, not
    one per step)."""
    return jax.device_put(np.int32(value), run.train_step.input_shardings[0][4])


def _summary(
    run: _Run, steps: int, stop_reason: str, schedule_steps: int, wall_time_s: float
) -> dict:
    """The run's summary.json: what was trained, how it went, and how fast."""
    best_val = min((v for v in run.val_history() if math.isfinite(v)), default=None)
    timed = run.timed_steps
    return {
        "model": run.config.model.name,
        "preset": run.config.get("preset"),
        "num_params": run.num_params,
        "steps": steps,
        "stop_reason": stop_reason,
        "schedule_steps": schedule_steps,  # the learning-rate schedule's length
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
