"""The models' hyperparameters: one frozen dataclass per model, whose fields (but the
vocabulary and the context length, which the data sets) are a config's `model` section,
defaults included (`default_section`). Light to import: config files load it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from charlm_jax.errors import UserError

INIT_STD = 0.02  # GPT-2 / nanoGPT initialisation
# The Transformer's string fields and their values.
CHOICES = {
    "position": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "activation": ("gelu", "relu2"),
    "attention": ("xla", "dot_product"),
}


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """The MLP's hyperparameters: `config.model` of configs/mlp.py (without `name`), and the
    vocabulary, which comes from the data. Raises UserError for values no model can be
    built from."""

    vocab_size: int
    window: int = 8  # characters each prediction sees, the current one included
    embedding_dim: int = 32
    hidden_dim: int = 256
    num_layers: int = 2
    dropout_rate: float = 0.0
    dtype: np.dtype = np.dtype("float32")  # compute dtype of the matmuls
    param_dtype: np.dtype = np.dtype("float32")

    def __post_init__(self):
        _check_positive(self, "window", "embedding_dim", "hidden_dim", "num_layers")
        _check_dropout(self.dropout_rate)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The Transformer's hyperparameters: `config.model` of configs/transformer.py (without
    `name`), and the vocabulary and context length, which come from the data. Raises
    UserError for values no model can be built from."""

    vocab_size: int
    context_length: int  # the longest text it sees (`data.context_length`)
    embedding_dim: int = 128
    hidden_dim: int = 512  # width of each block's MLP
    num_layers: int = 4
    num_heads: int = 4
    dropout_rate: float = 0.0
    position: str = "learned"  # "learned" | "rope"
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    use_bias: bool = False
    remat: bool = False  # recompute block activations in the backward pass (saves memory)
    # Options of the speedrun (docs/speedrun.md); these defaults are nanoGPT's model.
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (no learned scale)
    activation: str = "gelu"  # the MLP's: "gelu" (tanh approximation) | "relu2" (squared ReLU)
    tie_embeddings: bool = True  # the output head is the token embedding (False: its own)
    zero_init: bool = False  # projections into the residual stream, and an own head, start at 0
    # Adds an embedding of each (previous, current) token pair to the token's: an exact
    # bigram table, (vocab + 1) x vocab rows (a window's first token pairs with "none").
    bigram_embedding: bool = False
    logit_softcap: float = 0.0  # > 0: logits = softcap * tanh(logits / softcap)
    attention: str = "xla"  # "xla" | "dot_product" (jax.nn.dot_product_attention: cuDNN on GPUs)
    dtype: np.dtype = np.dtype("float32")  # compute dtype of the blocks' matmuls ("bfloat16")
    param_dtype: np.dtype = np.dtype("float32")  # parameters, embeddings, residual stream

    def __post_init__(self):
        _check_positive(self, "embedding_dim", "hidden_dim", "num_layers", "num_heads")
        _check_dropout(self.dropout_rate)
        if self.embedding_dim % self.num_heads:
            raise UserError(
                f"model.embedding_dim={self.embedding_dim} is not divisible by "
                f"num_heads={self.num_heads}"
            )
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise UserError(
                    f"unknown model.{name} {getattr(self, name)!r}: expected one of {choices}"
                )
        if self.logit_softcap < 0:
            raise UserError(f"model.logit_softcap must be >= 0, got {self.logit_softcap}")

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    @property
    def out_std(self) -> float:
        """Init scale of the projections into the residual stream (GPT-2's 1/sqrt(2 L), or 0
        with `zero_init`: each block starts as the identity, as in modded-nanogpt)."""
        return 0.0 if self.zero_init else INIT_STD / math.sqrt(2 * self.num_layers)


def _check_positive(cfg: MLPConfig | TransformerConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise UserError(f"model.{name} must be positive, got {getattr(cfg, name)}")


def _check_dropout(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise UserError(f"model.dropout_rate must be in [0, 1), got {rate}")


CONFIG_CLASSES = {"transformer": TransformerConfig, "mlp": MLPConfig}
FROM_DATA = ("vocab_size", "context_length")  # config fields that the data sets, not `model`
DTYPE_FIELDS = ("dtype", "param_dtype")  # np.dtype in the dataclass, their names in a config


def section_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of config dataclass `cls` that a config's `model` section holds."""
    return [f for f in dataclasses.fields(cls) if f.name not in FROM_DATA]


def default_section(name: str) -> dict[str, Any]:
    """The `config.model` section of model `name` ("transformer" | "mlp") with every field at
    its default: `name`, and the fields of its config dataclass that the data does not set."""
    section = {"name": name}
    for f in section_fields(CONFIG_CLASSES[name]):
        section[f.name] = f.default.name if f.name in DTYPE_FIELDS else f.default
    return section
