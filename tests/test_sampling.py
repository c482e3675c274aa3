from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from charlm_jax.data.tokenizers import CharTokenizer, UnknownCharacterError
from charlm_jax.decoding.engine import (
    SamplingParams,
    choose_tokens,
    filter_logits,
    gumbel_noise,
    seed_bits,
)
from charlm_jax.decoding.sampling import Sampler
from charlm_jax.model import models

TEXT = "abcdefghij klmnop\n"
CONTEXT = 32

VARIANTS = [
    ("transformer", {}),
    # With the bigram embedding each token pairs with the one before it, read from the cache.
    (
        "transformer",
        {"model.position": "rope", "model.norm": "rmsnorm", "model.bigram_embedding": True},
    ),
    ("mlp", {}),
]


def make_sampler(name="transformer", context=CONTEXT, **overrides) -> Sampler:
    tokenizer = CharTokenizer.from_text(TEXT)
    config = tiny_config(name, **{"data.context_length": context, **overrides})
    # A larger init than training's makes the random model's logits far from uniform.
    model = models.create_model(config, tokenizer.vocab_size, nnx.Rngs(7))
    if getattr(model, "bigram", None) is not None:  # zero at init: random rows instead
        table = model.bigram.embedding
        table[...] = models.INIT_STD * jax.random.normal(jax.random.key(8), table.shape)
    state = nnx.state(model)
    state = jax.tree.map(lambda p: p * 8 if p.ndim > 1 else p, state)
    nnx.update(model, state)
    return Sampler(model, tokenizer, context)


def full_logits(sampler: Sampler):
    """Last-position logits of the model run on the whole text (right-padded to the context,
    one compilation; causality makes the padding irrelevant)."""
    run = jax.jit(lambda ids: sampler.model(ids))

    def logits(ids: list[int]) -> np.ndarray:
        padded = np.zeros((1, sampler.context_length), np.int32)
        padded[0, : len(ids)] = ids
        return np.asarray(run(padded)[0, len(ids) - 1])

    return logits


class Reference(NamedTuple):
    text: str
    logits: list[np.ndarray]  # of each step
    lengths: list[int]  # of the window each step's logits come from


def greedy_reference(sampler: Sampler, prompt: str, steps: int) -> Reference:
    """Greedy decoding that reruns the model on the whole text, with the sampler's policy
    for a full context: drop the oldest half."""
    logits_of, context = full_logits(sampler), sampler.context_length
    ctx = list(sampler.tokenizer.encode(prompt))
    out, all_logits, lengths = [], [], []
    for _ in range(steps):
        logits = logits_of(ctx)
        all_logits.append(logits)
        lengths.append(len(ctx))
        token = int(np.argmax(logits))
        out.append(token)
        ctx.append(token)
        if len(ctx) > context:
            ctx = ctx[context // 2 :]
    return Reference(sampler.tokenizer.decode(out), all_logits, lengths)


@pytest.mark.parametrize(("name", "overrides"), VARIANTS)
def test_cached_greedy_equals_full_recomputation(name, overrides):
    sampler = make_sampler(name, **overrides)
    prompt = "abc def"
    expected = greedy_reference(sampler, prompt, CONTEXT - len(prompt)).text
    assert sampler.generate([prompt], CONTEXT - len(prompt), temperature=0.0)[0] == expected
    # The log-probabilities of each step are compared in tests/test_engine.py.


@pytest.mark.parametrize(("name", "overrides"), VARIANTS)
def test_beyond_the_context_follows_the_documented_policy(name, overrides):
    sampler = make_sampler(name, **overrides)
    steps = 3 * CONTEXT  # several refills of the window
    expected = greedy_reference(sampler, "ab", steps).text
    out = sampler.generate(["ab"], steps, temperature=0.0)[0]
    assert len(out) == steps and out == expected


@pytest.mark.parametrize(("name", "overrides"), VARIANTS)
def test_each_row_of_a_batch_decodes_as_if_alone(name, overrides):
    sampler = make_sampler(name, **overrides)
    # Row 1's text starts 19 slots in, 3 after the first refill: the second refill keeps
    # more than half the buffer (a full-width prefill), the first only half.
    prompts = ["a", "klmnop abc de", "", "j" * (CONTEXT + 5)]
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 3}):
        batch = sampler.generate(prompts, 2 * CONTEXT, **kwargs)
        alone = [sampler.generate([p], 2 * CONTEXT, **kwargs)[0] for p in prompts[:1]]
        assert batch[0] == alone[0]
        # Rows other than 0 draw from keys of their own index: compare greedy everywhere.
        if kwargs["temperature"] == 0.0:
            assert batch == [sampler.generate([p], 2 * CONTEXT, **kwargs)[0] for p in prompts]


def test_seeds_reproduce_and_differ():
    sampler = make_sampler()
    a = sampler.generate(["ab", "cd"], 50, seed=1)
    assert a == sampler.generate(["ab", "cd"], 50, seed=1)
    assert a != sampler.generate(["ab", "cd"], 50, seed=2)
    assert a[0] != a[1]
    assert all(len(t) == 50 and set(t) <= set(TEXT) for t in a)


def test_stop_string_and_streaming():
    sampler = make_sampler()
    full = sampler.generate(["ab"], 40, seed=0)[0]
    pieces = list(sampler.stream(["ab"], 40, seed=0, chunk=16))
    assert [len(p[0]) for p in pieces] == [16, 16, 8]
    assert "".join(p[0] for p in pieces) == full
    stop = full[10:12]
    assert sampler.generate(["ab"], 40, seed=0, stop=stop)[0] == full[: full.index(stop)]


def test_no_recompilation_for_new_prompts_and_lengths():
    sampler = make_sampler()

    def compiled():
        return sum(
            e._step._cache_size() + e._prefill._cache_size() for e in sampler._engines.values()
        )

    sampler.generate(["a", "bcd"], 64, seed=0)  # prompts and a rebuild, one row at a time
    size = compiled()
    sampler.generate(["abcdefgh", ""], 50, temperature=0.5, top_k=3, top_p=0.9, seed=4)
    sampler.generate(["k", "lm"], 64, temperature=0.0)
    assert compiled() == size


def test_filter_logits():
    logits = jnp.array([1.0, 3.0, 2.0, 0.0, -1.0])
    kept = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, jnp.int32(k), jnp.float32(p))))  # noqa: E731
    assert kept(0, 1.0).all()
    assert kept(1, 1.0).tolist() == [False, True, False, False, False]
    assert kept(3, 1.0).tolist() == [True, True, True, False, False]
    assert kept(0, 0.01).tolist() == [False, True, False, False, False]
    # softmax = [.086, .636, .234, .032, .012]: 0.8 needs the top two.
    assert kept(0, 0.8).tolist() == [False, True, True, False, False]
    # The top 3's probabilities sum to 0.99999994 in float32: top_p=1 must not undo top-k.
    logits = jnp.array([-0.6278456, 2.9160414, 3.9205167, 3.6032698, 2.6302075])
    assert kept(3, 1.0).tolist() == [False, True, True, True, False]
    assert kept(3, 0.999).sum() == 3


def test_sampling_follows_the_distribution():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    rows = 100
    params = SamplingParams(jnp.ones(rows), jnp.zeros(rows, jnp.int32), jnp.ones(rows))
    seeds = np.stack([seed_bits(i) for i in range(rows)])
    per_step = jax.vmap(choose_tokens, (None, None, 0, None), out_axes=1)
    steps = jnp.broadcast_to(jnp.arange(200)[:, None], (200, rows))
    draws = np.asarray(per_step(jnp.broadcast_to(logits, (rows, 4)), seeds, steps, params))
    freq = np.bincount(draws.ravel(), minlength=4) / draws.size  # 100 rows x 200 steps
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    # A row's successive draws are independent: the same token twice with prob. sum(p^2).
    assert abs(np.mean(draws[:, 1:] == draws[:, :-1]) - 0.365) < 0.015
    greedy = params._replace(temperature=jnp.zeros(rows))
    assert (choose_tokens(jnp.broadcast_to(logits, (rows, 4)), seeds, steps[0], greedy) == 0).all()


def test_gumbel_noise_moments():
    noise = jax.vmap(gumbel_noise, (None, 0, None))(seed_bits(1), jnp.arange(1000), 100)
    assert abs(float(noise.mean()) - 0.5772) < 0.01  # Euler-Mascheroni
    assert abs(float(noise.var()) - np.pi**2 / 6) < 0.03


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"max_new_tokens": -5}, "max_new_tokens must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_sampler().generate(["ab"], **{"max_new_tokens": 5, **kwargs})


def test_unknown_character_in_prompt():
    with pytest.raises(UnknownCharacterError, match="unknown character 'Z'"):
        make_sampler().generate(["abZ"], 5)


def test_log_probs_and_perplexity():
    sampler = make_sampler()
    text = "abc defg hij" * 5  # longer than the context: scored in windows
    logp = sampler.log_probs(text)
    assert logp.shape == (len(text) - 1,) and (logp <= 0).all()
    ids = sampler.tokenizer.encode(text[:10])
    direct = jax.nn.log_softmax(sampler.model(jnp.asarray(ids[None, :-1])))[0]
    np.testing.assert_allclose(logp[:9], np.asarray(direct)[np.arange(9), ids[1:]], atol=1e-5)
    assert sampler.perplexity(text) == pytest.approx(np.exp(-logp.mean()), rel=1e-5)


def beam_reference(sampler: Sampler, prompt: str, beam_size: int, steps: int) -> str:
    """Plain beam search that reruns the model on each beam's whole window, with the
    sampler's policy for a full context: drop the oldest half."""
    logits_of, context = full_logits(sampler), sampler.context_length
    beams = [(0.0, list(sampler.tokenizer.encode(prompt)), [])]
    for _ in range(steps):
        candidates = []
        for score, window, out in beams:
            logp = jax.nn.log_softmax(logits_of(window))
            candidates += [
                (score + float(lp), window + [t], out + [t]) for t, lp in enumerate(logp)
            ]
        beams = sorted(candidates, key=lambda c: -c[0])[:beam_size]
        beams = [(s, w[context // 2 :] if len(w) > context else w, o) for s, w, o in beams]
    return sampler.tokenizer.decode(beams[0][2])


@pytest.mark.parametrize("name", ["transformer", "mlp"])
def test_beam_search_matches_a_plain_implementation(name):
    sampler = make_sampler(name)
    assert sampler.generate(["ab"], 12, beam_size=3) == [beam_reference(sampler, "ab", 3, 12)]
    # A beam of one is greedy decoding.
    assert sampler.beam_search("ab", 1, 12) == sampler.generate(["ab"], 12, temperature=0.0)[0]


@pytest.mark.parametrize("name", ["transformer", "mlp"])
def test_beam_search_follows_the_context_policy(name):
    sampler = make_sampler(name)
    steps = 2 * CONTEXT + 5  # three rebuilds of the window from a 4-character prompt
    assert sampler.beam_search("klm ", 4, steps) == beam_reference(sampler, "klm ", 4, steps)
    long_prompt = "klm" * CONTEXT  # only its last CONTEXT characters are kept
    greedy = sampler.generate([long_prompt], steps, temperature=0.0)[0]
    assert sampler.beam_search(long_prompt, 1, steps) == greedy


def test_beam_search_rejects_sampling_options():
    with pytest.raises(ValueError, match="beam_size > 1 is deterministic"):
        make_sampler().generate(["ab"], 5, beam_size=2, temperature=0.5)


def test_missing_workdir_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoints in"):
        Sampler.from_workdir(tmp_path / "nope")
