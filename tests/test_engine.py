import jax
import numpy as np
import pytest
from test_sampling import CONTEXT, VARIANTS, greedy_reference, make_sampler

from charlm_jax.decoding.engine import Engine, EngineFull, Request, stop_position

STEPS = 8  # tokens per engine call in these tests


def run_alone(engine: Engine, request: Request):
    """All of `request`'s outputs, decoded with nothing else in `engine`."""
    engine.insert(request)
    outputs = []
    while engine.active_slots():
        outputs += engine.step()
    return outputs


def joined(outputs, field="tokens"):
    return np.concatenate([getattr(o, field) for o in outputs])


@pytest.fixture(scope="module")
def sampler():
    return make_sampler()


@pytest.fixture(scope="module")
def engine(sampler):
    return Engine(sampler.model, CONTEXT, num_slots=4, steps_per_call=STEPS)


@pytest.mark.parametrize(("name", "overrides"), VARIANTS)
def test_greedy_equals_full_recomputation_across_refills(name, overrides):
    sampler = make_sampler(name, **overrides)
    engine = Engine(sampler.model, CONTEXT, num_slots=2, steps_per_call=STEPS)
    prompt, steps = "abc def", 3 * CONTEXT  # several rebuilds of the window
    outputs = run_alone(engine, Request(sampler.tokenizer.encode(prompt), steps, temperature=0))
    expected, ref_logits = greedy_reference(sampler, prompt, steps)
    assert sampler.tokenizer.decode(joined(outputs)) == expected
    # The log-probabilities of every step: from the prefills, the cache and the rebuilds.
    ref_logp = jax.nn.log_softmax(np.stack(ref_logits))
    tokens = joined(outputs)
    np.testing.assert_allclose(
        joined(outputs, "logprobs"), ref_logp[np.arange(steps), tokens], atol=1e-4
    )
    top = joined(outputs, "top_logprobs")
    np.testing.assert_allclose(top, -np.sort(-ref_logp, axis=1)[:, : top.shape[1]], atol=1e-4)
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert engine.free_slots() == [0, 1]


def test_a_request_decodes_the_same_in_any_slot_beside_anything(sampler, engine):
    encode = sampler.tokenizer.encode
    target = Request(encode("klm"), 3 * CONTEXT, temperature=0.9, top_k=5, top_p=0.9, seed=11)
    alone = run_alone(engine, target)
    others = [
        Request(encode("ab"), 5 * CONTEXT, temperature=1.0, seed=1),
        Request(encode("j" * (CONTEXT + 3)), 4 * CONTEXT, temperature=0.0),
        Request(encode("no"), 2 * CONTEXT, temperature=0.5, top_p=0.5, seed=2),
    ]
    for other in others:
        engine.insert(other)
    for _ in range(3):  # the others are mid-way, one of them about to fill its window
        engine.step()
    engine.free(1)
    assert engine.insert(target) == 1  # a different slot, a different time
    busy = []
    while 1 in engine.active_slots():
        busy += [o for o in engine.step() if o.slot == 1]
    for field in ("tokens", "logprobs", "top_ids", "top_logprobs"):
        np.testing.assert_array_equal(joined(busy, field), joined(alone, field))
    for slot in engine.active_slots():
        engine.free(slot)


def test_no_recompilation_in_steady_state(sampler, engine):
    rng = np.random.default_rng(0)
    vocab = sampler.tokenizer.vocab_size

    def request(length, new_tokens):
        return Request(rng.integers(0, vocab, length), new_tokens, seed=length)

    engine.warm_up()
    compiled = engine._step._cache_size() + engine._prefill._cache_size()
    produced = 0
    lengths, new_tokens = rng.integers(1, 2 * CONTEXT, (2, 40))  # and their rebuilds
    for outputs in engine.generate(map(request, lengths, new_tokens)):
        produced += sum(len(o.tokens) for _, o in outputs)
    assert produced == new_tokens.sum()
    assert engine._step._cache_size() + engine._prefill._cache_size() == compiled


def test_generate_yields_every_token_of_every_request(sampler, engine):
    encode = sampler.tokenizer.encode
    requests = [Request(encode("ab"), n, temperature=0, seed=0) for n in (3, 40, 9, 1, 17, 5)]
    texts = [[] for _ in requests]
    for outputs in engine.generate(requests):
        for index, output in outputs:
            texts[index] += output.tokens.tolist()
    assert [len(t) for t in texts] == [3, 40, 9, 1, 17, 5]
    # Greedy from the same prompt: each is a prefix of the longest.
    assert all(t == texts[1][: len(t)] for t in texts)


def test_free_stops_a_request_and_is_idempotent(sampler, engine):
    slot = engine.insert(Request(sampler.tokenizer.encode("ab"), 100))
    engine.step()
    engine.free(slot)
    engine.free(slot)
    assert slot in engine.free_slots() and engine.step() == []


def test_bad_input(sampler):
    engine = Engine(sampler.model, CONTEXT, num_slots=1)
    ids = sampler.tokenizer.encode("ab")
    engine.insert(Request(ids, 5))
    with pytest.raises(EngineFull, match=r"no free slot \(num_slots=1 busy\)"):
        engine.insert(Request(ids, 5))
    engine.free(0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.insert(Request(np.array([0, 999]), 5))
    for kwargs, message in [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_k": -2}, "top_k must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            Request(ids, **{"max_new_tokens": 5, **kwargs})
    with pytest.raises(ValueError, match="non-empty"):
        Request(np.zeros(0, np.int32), 5)


def test_stop_position():
    assert stop_position("abc\n\nde", ["\n\n", "c"]) == 2
    assert stop_position("abc", ["x", ""]) is None
