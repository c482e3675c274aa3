import dataclasses
import json

import pytest

from charlm_jax import config_defaults
from charlm_jax.errors import UserError
from charlm_jax.model import config as model_config
from charlm_jax.model import models
from charlm_jax.workdir import checkpoints
from configs import mlp, transformer

CONFIG_FILES = {"transformer": transformer, "mlp": mlp}


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
    assert (baby.model.hidden_dim, baby.train.beta2, baby.train.warmup_steps) == (512, 0.99, 100)
    assert (baby.train.min_learning_rate, baby.train.eval_every) == (1e-4, 250)
    assert baby.train.eval_batches == 20
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
    with pytest.raises(UserError, match="unknown preset 'huge'; choose one of: default, small"):
        transformer.get_config("huge")


def test_a_preset_of_an_unknown_field_is_refused():
    with pytest.raises(UserError, match="preset 'x' sets unknown field 'model.depth'"):
        config_defaults.apply_preset(transformer.get_config(), {"x": {"model.depth": 2}}, "x")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_model_section_is_the_model_dataclass(name):
    """Every preset's `model` section: `name` and exactly its dataclass's fields (but the
    data's), at the dataclass's defaults unless the preset sets them."""
    module = CONFIG_FILES[name]
    cls = model_config.CONFIG_CLASSES[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "context_length"}
    for preset in module.PRESETS:
        section = module.get_config(preset).model
        assert set(section) == {"name"} | fields, preset
        built = models.model_config(module.get_config(preset), vocab_size=5)
        assert {f: getattr(built, f) for f in fields if "dtype" not in f} == {
            f: section[f] for f in fields if "dtype" not in f
        }
        unset = {f for f in fields if f"model.{f}" not in module.PRESETS[preset]}
        defaults = model_config.default_section(name)
        assert {f: section[f] for f in unset} == {f: defaults[f] for f in unset}, preset


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_presets_set_only_what_differs(name, monkeypatch):
    module = CONFIG_FILES[name]
    presets = module.PRESETS
    monkeypatch.setattr(module, "PRESETS", {"default": {}})
    base = module.get_config()
    for preset, fields in presets.items():
        for dotted, value in fields.items():
            section, field = dotted.split(".")
            assert base[section][field] != value, f"{preset}: {dotted}={value!r} is the default"


def test_an_old_config_json_loads_in_todays_terms(tmp_path):
    """A config.json from before the renames and before some fields existed."""
    old = mlp.get_config().to_dict()
    old["model"]["context_size"] = old["model"].pop("window")
    old["data"]["sequence_length"] = old["data"].pop("context_length")
    del old["model"]["dropout_rate"], old["train"]["optimizer"], old["data"]["tokenizer"]
    (tmp_path / checkpoints.CONFIG_FILE).write_text(json.dumps(old))
    config = checkpoints.read_run_config(tmp_path)
    assert config.to_dict() == {**mlp.get_config().to_dict(), "model": config.model.to_dict()}
    assert config.model.to_dict() == {
        k: v for k, v in mlp.get_config().model.items() if k != "dropout_rate"
    }
    assert models.model_config(config, vocab_size=5) == models.model_config(
        mlp.get_config(), vocab_size=5
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.name": "rnn"}, "unknown model.name 'rnn'"),
        ({"model.depth": 2}, "model.depth is not a field of the transformer model"),
        ({"model.num_heads": 3}, "model.embedding_dim=128 is not divisible by num_heads=3"),
        ({"model.num_layers": 0}, "model.num_layers must be positive, got 0"),
        ({"model.dropout_rate": 1.0}, r"model.dropout_rate must be in \[0, 1\), got 1.0"),
        ({"model.norm": "batchnorm"}, "unknown model.norm 'batchnorm'"),
        ({"model.dtype": "float77"}, "bad model.dtype"),
    ],
)
def test_bad_model_fields_name_the_field(overrides, message):
    config = transformer.get_config()
    with config.unlocked():
        for dotted, value in overrides.items():
            section, field = dotted.split(".")
            config[section][field] = value
    with pytest.raises(UserError, match=message):
        models.check_config(config)
