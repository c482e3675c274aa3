import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_quantize import int8_dots
from test_sampling import CONTEXT, VARIANTS, greedy_reference, make_sampler

from charlm_jax.decoding import engine as engine_lib
from charlm_jax.decoding.engine import Engine, EngineFull, Request, stop_position
from charlm_jax.decoding.sampling import Sampler
from charlm_jax.model import int8, models

STEPS = 8  # tokens per engine call in these tests
LONG = 3 * models.KV_BLOCK  # a context of three cache blocks


def run_alone(engine: Engine, request: Request):
    """All of `request`'s outputs, decoded with nothing else in `engine`."""
    engine.insert(request)
    outputs = []
    while engine.active_slots():
        outputs += engine.step()
    return outputs


def joined(outputs, field="tokens"):
    return np.concatenate([getattr(o, field) for o in outputs])


@pytest.fixture(scope="module", autouse=True)
def default_codegen():
    """The engine's decode calls compiled at XLA's default LLVM optimisation level, as they
    run outside the tests (conftest lowers it): the bit-for-bit comparisons here hold there."""
    options = {**engine_lib.COMPILER_OPTIONS, "xla_backend_optimization_level": 3}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_lib, "COMPILER_OPTIONS", options)
        yield


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
    assert_equals_recomputation(sampler, outputs, greedy_reference(sampler, prompt, steps))
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert engine.free_slots() == [0, 1]


def assert_equals_recomputation(sampler, outputs, reference):
    """The tokens and log-probabilities of every step (from the prefills, the cache and the
    rebuilds) equal those of the full forward pass over each step's window."""
    assert sampler.tokenizer.decode(joined(outputs)) == reference.text
    ref_logp = jax.nn.log_softmax(np.stack(reference.logits))
    tokens = joined(outputs)
    np.testing.assert_allclose(
        joined(outputs, "logprobs"), ref_logp[np.arange(len(tokens)), tokens], atol=1e-4
    )
    top = joined(outputs, "top_logprobs")
    np.testing.assert_allclose(top, -np.sort(-ref_logp, axis=1)[:, : top.shape[1]], atol=1e-4)


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


@pytest.fixture(scope="module")
def long_sampler():
    return make_sampler(context=LONG)


@pytest.fixture(scope="module")
def long_engine(long_sampler):
    return Engine(long_sampler.model, LONG, num_slots=4, steps_per_call=16)


def test_long_context_greedy_equals_recomputation_in_every_block(long_sampler, long_engine):
    steps = LONG + LONG // 2 + 20  # two rebuilds of the window
    request = Request(long_sampler.tokenizer.encode("ab"), steps, temperature=0)
    reference = greedy_reference(long_sampler, "ab", steps)
    # The windows end in every cache block, before and after the rebuilds.
    blocks = [(n - 1) // models.KV_BLOCK for n in reference.lengths]
    assert set(blocks) == {0, 1, 2} and set(blocks[LONG:]) == {1, 2}
    assert_equals_recomputation(long_sampler, run_alone(long_engine, request), reference)


def test_long_context_request_beside_others_equals_it_alone(long_sampler, long_engine):
    encode = long_sampler.tokenizer.encode
    # Alone, its window stays in block 0 or 1: the blocks after it are skipped.
    target = Request(encode("klm"), 100, temperature=0.9, top_k=5, top_p=0.9, seed=11)
    alone = run_alone(long_engine, target)
    others = [  # windows in block 2, filling and rebuilt, and in block 0
        Request(encode("ab" * 80), 60, temperature=1.0, seed=1),
        Request(encode("j" * (LONG - 20)), 3 * LONG, temperature=0.0),
        Request(encode("no"), 40, temperature=0.5, top_p=0.5, seed=2),
    ]
    for other in others:
        long_engine.insert(other)
    long_engine.step()
    assert long_engine.insert(target) == 3
    beside = []
    while 3 in long_engine.active_slots():
        beside += [o for o in long_engine.step() if o.slot == 3]
    for field in ("tokens", "logprobs", "top_ids", "top_logprobs"):
        np.testing.assert_array_equal(joined(beside, field), joined(alone, field))
    for slot in long_engine.active_slots():
        long_engine.free(slot)


def test_a_row_gives_the_same_bits_whatever_the_columns_read(long_sampler):
    """Rows 0-2 see only block 0 (1, 3 and 41 columns). Beside a row 3 that sees as little,
    one block is read; beside a row 3 that sees all three, two or three are (rows 0-2 masked
    there). Rows 0-2's logits must have the same bits either way."""
    model, vocab = long_sampler.model, long_sampler.tokenizer.vocab_size
    tokens = jax.random.randint(jax.random.key(0), (4, LONG), 0, vocab)
    _, cache = engine_lib.prefill(model, tokens, jnp.full(4, LONG), LONG)
    step = jax.jit(
        lambda c, lengths, columns: engine_lib.append(
            model, c, tokens[:, -1], lengths, LONG, columns
        )[0],
        static_argnums=2,
    )
    narrow = step(cache, jnp.array([0, 2, 40, 30]), models.KV_BLOCK)
    for columns in (2 * models.KV_BLOCK, LONG):
        wide = step(cache, jnp.array([0, 2, 40, columns - 1]), columns)
        np.testing.assert_array_equal(narrow[:3], wide[:3])
        assert not np.array_equal(narrow[3], wide[3])  # row 3 did see more


def test_prefill_batch_invariance(sampler, monkeypatch):
    """A request prefilled alone, in a batch of 4 and in a batch of 16 gives the same
    tokens (and log-probabilities up to float rounding)."""
    engine = Engine(sampler.model, CONTEXT, num_slots=16, steps_per_call=STEPS)
    rng = np.random.default_rng(0)
    vocab = sampler.tokenizer.vocab_size
    # Prompts of 9-16 tokens share the prefill width 16: each batch is one prefill call,
    # and no window fills the context (no rebuild).
    target = Request(rng.integers(0, vocab, 11), 12, temperature=1.0, top_k=4, seed=5)
    others = [
        Request(rng.integers(0, vocab, 9 + i % 8), 12, temperature=i % 3 / 2, seed=i)
        for i in range(15)
    ]
    rows, prefill = [], engine._prefill

    def counting_prefill(weights, state, index, *args):
        rows.append(len(index))
        return prefill(weights, state, index, *args)

    monkeypatch.setattr(engine, "_prefill", counting_prefill)
    results = []
    for batch in (0, 3, 15):
        for request in [*others[:batch], target]:
            engine.insert(request)
        outputs = []
        while engine.active_slots():
            outputs += [o for o in engine.step() if o.slot == batch]
        results.append(outputs)
    assert rows == [1, 4, 16]
    for outputs in results[1:]:
        for field in ("tokens", "top_ids"):
            np.testing.assert_array_equal(joined(outputs, field), joined(results[0], field))
        # XLA:CPU rounds a matmul's rows differently with their number: a few ulps here.
        for field in ("logprobs", "top_logprobs"):
            np.testing.assert_allclose(joined(outputs, field), joined(results[0], field), atol=1e-5)


def test_int8_engine_decodes_through_int8_dots(sampler):
    """At 8 slots (int8.MIN_ROWS) the Sampler's engine for an int8 model keeps it int8:
    its compiled decode call runs int8 dots, its log-probabilities are within 0.1 nats of
    float32's and its greedy tokens agree with them."""
    quantized = Sampler(int8.quantize_model(sampler.model), sampler.tokenizer, CONTEXT)
    int8_engine, float32 = quantized.engine(8, STEPS), sampler.engine(8, STEPS)
    assert int8_engine.int8_dots and not float32.int8_dots
    # 2 blocks x (qkv, out, up, down) + the head
    assert int8_dots(int8_engine.compiled_step(CONTEXT).as_text()) == 9
    prompts = ["ab", "klm", "hij\n", "a b c", "nop", "defg", "j", "bcd efg"]
    requests = [Request(sampler.tokenizer.encode(p), STEPS, temperature=0) for p in prompts]
    # STEPS tokens each: every request's output comes from one call.
    want, got = (
        dict(o for step in e.generate(requests) for o in step) for e in (float32, int8_engine)
    )
    for i in range(len(prompts)):
        np.testing.assert_array_equal(got[i].tokens, want[i].tokens)
        for field in ("logprobs", "top_logprobs"):
            np.testing.assert_allclose(getattr(got[i], field), getattr(want[i], field), atol=0.1)
    assert not np.array_equal(got[0].top_logprobs, want[0].top_logprobs)  # int8_engine did run


@pytest.mark.parametrize("forced", [True, False])
def test_the_int8_choice_can_be_forced(sampler, forced):
    """Forced, the choice holds at any slot count, through warm_up."""
    quantized = int8.quantize_model(sampler.model)
    for slots in (1, int8.MIN_ROWS):
        engine = Engine(quantized, CONTEXT, slots, STEPS, int8_dots=forced)
        engine.warm_up()
        assert engine.int8_dots == forced
        assert int8_dots(engine.compiled_step(CONTEXT).as_text()) == 9 * forced


@pytest.mark.parametrize("slow", [True, False])
def test_warm_up_keeps_the_faster_dots(sampler, monkeypatch, slow):
    """warm_up times a decode call with int8 dots and with the float32 copy and keeps the
    faster: here the `slow` one is made slower by a sleep."""
    real = engine_lib._program

    def slowed(model, *args):
        program = real(model, *args)
        if int8.is_quantized(model) != slow:
            return program

        def step(*step_args):
            time.sleep(0.05)
            return program.step(*step_args)

        return program._replace(step=step)

    monkeypatch.setattr(engine_lib, "_program", slowed)
    engine = Engine(int8.quantize_model(sampler.model), CONTEXT, 2, STEPS)
    engine.warm_up()
    assert engine.int8_dots == (not slow)
    assert int8.is_quantized(nnx.merge(engine.graphdef, engine.weights)) == (not slow)
