import pytest

from configs import mlp, transformer


@pytest.mark.parametrize(
    ("preset", "sizes"),
    [("small", (64, 128, 2)), ("medium", (128, 256, 4)), ("large", (256, 512, 6))],
)
@pytest.mark.parametrize("module", [transformer, mlp])
def test_size_presets(module, preset, sizes):
    m = module.get_config(preset).model
    assert (m.embedding_dim, m.hidden_dim, m.num_layers) == sizes


def test_nanogpt_presets_match_nanogpt():
    baby = transformer.get_config("nanogpt_baby")
    assert (baby.model.num_layers, baby.model.num_heads, baby.model.embedding_dim) == (4, 4, 128)
    assert (baby.data.context_length, baby.train.batch_size, baby.train.num_steps) == (
        64,
        12,
        2000,
    )
    assert baby.train.learning_rate == 1e-3 and baby.model.dropout_rate == 0.0
    gpt = transformer.get_config("nanogpt")
    assert (gpt.model.num_layers, gpt.model.num_heads, gpt.model.embedding_dim) == (6, 6, 384)
    assert (gpt.data.context_length, gpt.train.batch_size, gpt.train.num_steps) == (256, 64, 5000)
    assert gpt.model.dropout_rate == 0.2 and gpt.train.beta2 == 0.99
    assert (gpt.train.warmup_steps, gpt.train.min_learning_rate) == (100, 1e-4)


def test_required_field_names():
    for module in (transformer, mlp):
        config = module.get_config()
        for dotted in (
            "model.embedding_dim",
            "model.hidden_dim",
            "model.num_layers",
            "model.dropout_rate",
            "data.path",
            "data.context_length",
            "train.batch_size",
            "train.learning_rate",
            "train.num_steps",
            "train.warmup_steps",
            "train.eval_every",
            "train.eval_batches",
            "train.seed",
        ):
            section, field = dotted.split(".")
            assert field in config[section], dotted
    assert "num_heads" in transformer.get_config().model


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of: default, small"):
        transformer.get_config("huge")
