"""Bengio / makemore-style MLP on characters: a window of previous characters -> next one.

--config=configs/mlp.py[:PRESET]   PRESET: default (the default), small, medium, large
"""

import ml_collections

from charlm_jax.config_defaults import apply_preset, base_config
from charlm_jax.model.config import default_section

# Each preset sets only the fields that differ from the defaults (the model's in
# charlm_jax/model/config.py, the others in charlm_jax/config_defaults.py and get_config).
PRESETS = {
    "default": {},
    # The seed tutorial's sizes (embedding / hidden / layers).
    "small": {"model.embedding_dim": 64, "model.hidden_dim": 128},
    "medium": {"model.embedding_dim": 128, "model.num_layers": 4},
    "large": {"model.embedding_dim": 256, "model.hidden_dim": 512, "model.num_layers": 6},
}


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    config = base_config(default_section("mlp"))
    config.train.learning_rate = 3e-3
    config.train.min_learning_rate = 3e-4
    return apply_preset(config, PRESETS, preset)
