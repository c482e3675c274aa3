"""The `data` and `train` sections every config file in `configs/` has (the `model` section's
fields and defaults are its config dataclass's: `model.config.default_section`), their preset
mechanism, and the upgrade of a config saved by an older version."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import ml_collections

from charlm_jax.errors import UserError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)


def base_config(model: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The data and train sections every config has, around the given `model` section."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(model))

    config.data = ml_collections.ConfigDict()
    config.data.source = "file"  # "file" (data.path) | "tfds" (data.tfds_name)
    config.data.path = ""  # UTF-8 text file; "" = the tiny Shakespeare copy inside the package
    config.data.download = False  # fetch data.download_url to data.path if that file is absent
    config.data.download_url = TINY_SHAKESPEARE_URL
    config.data.val_fraction = 0.1  # the last 10% of the text, by position
    config.data.context_length = 128  # tokens per training window: the Transformer's context
    config.data.allow_unknown = False  # map characters outside the vocabulary to <unk>
    config.data.decode_errors = "strict"  # "strict": bad UTF-8 is an error | "replace": U+FFFD
    config.data.lowercase = False  # preprocessing, saved with the tokenizer (prompts get it too)
    config.data.charset = ""  # keep only these characters ("" = all); the others are
    config.data.charset_replacement = ""  # replaced by this ("" = dropped)
    config.data.tokenizer = "char"  # "char" | "bpe" (trained on the training split)
    config.data.vocab_size = 512  # BPE only: tokens, <unk> and every character included
    config.data.memmap_above_mb = 100.0  # larger files: tokenized once to a memory-mapped cache
    config.data.batches = "auto"  # "device" | "host" (prefetched) | "auto": host if memory-mapped
    # TFDS (data.source="tfds"): a catalog dataset, or with data.path (a file, files separated
    # by commas, or a folder of them) a local corpus prepared as a TFDS dataset of that name.
    config.data.tfds_name = ""
    config.data.tfds_data_dir = ""  # "" = TFDS's default (~/tensorflow_datasets)
    config.data.tfds_manual_dir = ""  # a catalog dataset's downloaded source files (offline)
    config.data.tfds_download = False  # allow TFDS to download a catalog dataset's sources

    config.train = ml_collections.ConfigDict()
    config.train.seed = 0
    config.train.batch_size = 32  # sequences per (micro-)batch, over all devices together
    config.train.num_steps = 2000
    config.train.num_epochs = 0.0  # > 0: train this many passes over the training tokens instead
    config.train.time_budget_s = (
        0.0  # > 0: stop when spent (num_steps caps it), the schedule fitted
    )
    config.train.learning_rate = 1e-3  # peak, after linear warmup; then cosine decay
    config.train.min_learning_rate = 1e-4  # reached at num_steps
    config.train.warmup_steps = 100
    config.train.schedule = "cosine"  # "cosine" | "wsd": warmup, stable, linear decay over
    config.train.decay_fraction = 0.3  # this last fraction of the steps (wsd only)
    config.train.optimizer = "adamw"  # "adamw" | "muon": Muon on the blocks' matrices, AdamW
    config.train.muon_learning_rate = 0.02  # on the rest (muon only: its peak and momentum)
    config.train.muon_momentum = 0.95
    config.train.weight_decay = 0.1  # AdamW, on weight matrices and embeddings only
    config.train.beta1 = 0.9
    config.train.beta2 = 0.99
    config.train.grad_clip_norm = 1.0
    config.train.grad_accum_steps = 1  # micro-batches of batch_size per optimizer update
    config.train.fsdp = False  # also shard parameters and optimizer state over the devices
    config.train.deterministic = True  # bitwise-reproducible GPU steps (exact resume); slower
    config.train.eval_every = 250  # steps; each evaluation also writes a checkpoint
    config.train.eval_batches = 20
    config.train.log_every = 50
    config.train.checkpoint_every = 0  # steps between extra checkpoints (0: evaluations only)
    config.train.keep_checkpoints = 1  # the latest K are kept, and the best by val loss
    config.train.early_stopping_patience = 0  # stop after this many evaluations without
    config.train.early_stopping_min_delta = 0.0  # an improvement of val loss by this (0: off)
    return config


def apply_preset(
    config: ml_collections.ConfigDict, presets: Mapping[str, Mapping[str, Any]], name: str
) -> ml_collections.ConfigDict:
    """Applies `presets[name]`, a mapping of dotted field names to values."""
    if name not in presets:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    for dotted, value in presets[name].items():
        section, field = dotted.split(".")
        if field not in config[section]:
            raise UserError(f"preset {name!r} sets unknown field {dotted!r}")
        config[section][field] = value
    config.preset = name
    return config


# Fields renamed since a run saved its config.json: old dotted name -> new one.
RENAMED = {"data.sequence_length": "data.context_length", "model.context_size": "model.window"}


def upgrade(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A config saved by an older version (a run's config.json, as a dict) in today's terms:
    renamed fields under their new names, and the `data` and `train` fields it lacks at
    today's defaults (a missing `model` field takes its dataclass default when the model is
    built)."""
    saved = copy.deepcopy(dict(saved))
    for old, new in RENAMED.items():
        section, field = old.split(".")
        if field in saved.get(section, {}):
            saved[section][new.split(".")[1]] = saved[section].pop(field)
    config = base_config(saved.get("model", {}))
    config.update({key: value for key, value in saved.items() if key != "model"})
    return config
