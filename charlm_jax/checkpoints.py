"""`charlm_jax.checkpoints.load_model` (the documented import): runs are opened by
`charlm_jax.workdir.loader` (`open_run` gives the loaded step and quantization too)."""

from charlm_jax.workdir.loader import load_model

__all__ = ["load_model"]
