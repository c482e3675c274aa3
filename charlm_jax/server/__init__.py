"""An OpenAI-compatible HTTP server over the decode engine (`python -m charlm_jax.serve`).

protocol.py  the /v1/completions request fields, their checks, and the response JSON
scheduler.py the engine thread: admits waiting sequences into free slots, steps the batch,
             applies stop strings and timeouts, and hands each sequence's text to its request
cache.py     the LRU cache of deterministic completions
metrics.py   the Prometheus metrics
app.py       the FastAPI app: routes, streaming, limits, draining
playground.html  the page served at GET /
"""
