"""`from charlm_jax.sampling import Sampler` (the documented import): the Sampler lives in
`charlm_jax.decoding.sampling`."""

from charlm_jax.decoding.sampling import Sampler

__all__ = ["Sampler"]
