"""`charlm_jax.checkpoints.load_model` (the documented import): checkpoints live in
`charlm_jax.workdir.checkpoints`."""

from charlm_jax.workdir.checkpoints import load_model

__all__ = ["load_model"]
