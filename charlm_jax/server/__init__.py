"""An OpenAI-compatible HTTP server over the decode engine (`python -m charlm_jax.serve`).

protocol.py  the /v1/completions request fields, their bounds (one table), the response JSON
service.py   what the routes share: admission by work, the cache, one request in flight
scheduler.py the engine thread: admits waiting sequences into free slots, steps the batch,
             applies stop strings and timeouts, hands each sequence's text to its request;
             and its watchdog
cache.py     the LRU cache of deterministic completions
prometheus.py the Prometheus metrics
app.py       the FastAPI app: routes, streaming, body limits, the API key, uvicorn's limits
playground.html  the page served at GET /
"""
