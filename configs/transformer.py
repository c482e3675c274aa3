"""Decoder-only Transformer (GPT) on characters.

--config=configs/transformer.py[:PRESET]   PRESET: default (the default), small, medium,
                                           large, demo, nanogpt_baby, nanogpt,
                                           speedrun, speedrun_gpu
"""

import ml_collections

from charlm_jax.config_defaults import apply_preset, base_config
from charlm_jax.model.config import default_section

# The speedrun's model (docs/speedrun.md has each change's effect): modded-nanogpt's changes.
SPEEDRUN_MODEL = {
    "model.position": "rope",
    "model.qk_norm": True,
    "model.activation": "relu2",
    "model.tie_embeddings": False,
    "model.zero_init": True,
    "model.bigram_embedding": True,
}

# The speedrun's recipe: that model trained by Muon (AdamW for the rest) on a warmup-stable-
# decay schedule, in batches of 32 (the default).
SPEEDRUN = {
    **SPEEDRUN_MODEL,
    "train.optimizer": "muon",
    "train.muon_learning_rate": 0.05,
    "train.learning_rate": 2e-2,
    "train.min_learning_rate": 2e-3,
    "train.schedule": "wsd",
    "train.decay_fraction": 0.5,
    "train.warmup_steps": 50,
}

# Each preset sets only the fields that differ from the defaults (the model's in
# charlm_jax/model/config.py, the others in charlm_jax/config_defaults.py).
PRESETS = {
    # The best model 5 minutes of a 2-core CPU buy (docs/training.md: the speedrun's recipe
    # with the depth and context a sweep under the budget chose), whole process included.
    "default": {
        **SPEEDRUN,
        "train.num_steps": 100_000,  # a cap: the time budget ends the run
        "train.time_budget_s": 285.0,
        "train.log_every": 100,
    },
    # The seed tutorial's sizes (embedding / hidden / layers).
    "small": {
        "model.embedding_dim": 64,
        "model.hidden_dim": 128,
        "model.num_layers": 2,
    },
    "medium": {
        "model.hidden_dim": 256,
    },
    "large": {
        "model.embedding_dim": 256,
        "model.num_layers": 6,
        "model.num_heads": 8,
        "model.dropout_rate": 0.1,
        "train.num_steps": 5000,
    },
    # experiments/demo.py: a small model trained briefly on a CPU (RoPE: it learns much
    # faster than learned positions in short runs, docs/results.md).
    "demo": {
        "model.embedding_dim": 64,
        "model.hidden_dim": 256,
        "model.num_layers": 2,
        "model.position": "rope",
        "data.context_length": 64,
        "train.num_steps": 800,
        "train.warmup_steps": 50,
        "train.learning_rate": 3e-3,
        "train.min_learning_rate": 3e-4,
        "train.eval_every": 100,
        "train.log_every": 100,
    },
    # nanoGPT's "baby GPT" for CPU (README of karpathy/nanoGPT): the defaults are its model
    # and schedule (tests/test_configs.py checks both nanoGPT presets).
    "nanogpt_baby": {
        "data.context_length": 64,
        "train.batch_size": 12,
    },
    # nanoGPT's config/train_shakespeare_char.py (a GPU config).
    "nanogpt": {
        "model.embedding_dim": 384,
        "model.hidden_dim": 1536,
        "model.num_layers": 6,
        "model.num_heads": 6,
        "model.dropout_rate": 0.2,
        "data.context_length": 256,
        "train.batch_size": 64,
        "train.num_steps": 5000,
        "train.eval_batches": 200,
    },
    # experiments/speedrun.py's record recipe (docs/speedrun.md): nanogpt_baby's quality after
    # its 2000 steps in as little wall time as possible on a CPU; the step budget reaches it.
    "speedrun": {
        **SPEEDRUN,
        "data.context_length": 64,
        "train.num_steps": 150,
        "train.eval_every": 150,
    },
    # The GPU counterpart: the nanogpt preset's quality (val 1.47) with the speedrun's changes,
    # bfloat16 matmuls and cuDNN attention. Not yet run on a GPU: its numbers are guesses.
    "speedrun_gpu": {
        **SPEEDRUN_MODEL,
        "model.embedding_dim": 384,
        "model.hidden_dim": 1536,
        "model.num_layers": 6,
        "model.num_heads": 6,
        "model.dropout_rate": 0.2,
        "model.dtype": "bfloat16",
        "model.attention": "dot_product",
        "data.context_length": 256,
        "train.batch_size": 64,
        "train.optimizer": "muon",
        "train.learning_rate": 2e-3,
        "train.min_learning_rate": 2e-4,
        "train.schedule": "wsd",
        "train.num_steps": 2500,
        "train.eval_batches": 200,
    },
}


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    return apply_preset(base_config(default_section("transformer")), PRESETS, preset)
