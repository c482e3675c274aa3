"""A trained Transformer as a Hugging Face model folder, which
`transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load
(tests/test_export.py), as do engines that read the same layout such as vLLM (`vllm serve
DIR`, not tested here): model.safetensors (float32), config.json, generation_config.json,
tokenizer.json and tokenizer_config.json.

Each model maps onto the standard architecture that computes exactly what it computes:

    positions  norm       architecture
    learned    layernorm  GPT-2      (GPT2LMHeadModel)
    rope       layernorm  GPT-NeoX   (GPTNeoXForCausalLM, sequential residual)
    rope       rmsnorm    Arcee      (ArceeForCausalLM: Llama's attention, an ungated MLP)

with the MLP's activation (GELU's tanh form or squared ReLU), biases (absent ones written as
zeros where the architecture always has them) and the head (tied or own) carried over.
Options no standard architecture computes (QK-norm, a logit soft-cap, learned positions
with RMSNorm, the MLP model) stop the export with a UserError naming the option.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from charlm_jax.data import hf_tokenizer
from charlm_jax.data.tokenizers import load_tokenizer
from charlm_jax.errors import UserError
from charlm_jax.model import models
from charlm_jax.workdir import checkpoints, loader

NORM_EPS = 1e-5  # models.make_norm's
ROPE_BASE = 10000.0  # models.rope's
ACTIVATIONS = {"gelu": "gelu_pytorch_tanh", "relu2": "relu2"}  # transformers' ACT2FN names


def architecture(cfg: models.TransformerConfig | models.MLPConfig) -> str:
    """The architecture `cfg` exports as ("gpt2", "gpt_neox" or "arcee"); UserError naming
    the option that none computes."""
    if not isinstance(cfg, models.TransformerConfig):
        raise UserError("the MLP model has no standard architecture: only Transformers export")
    if cfg.qk_norm:
        raise UserError("model.qk_norm=True (QK-norm) has no standard architecture to export to")
    if cfg.logit_softcap:
        raise UserError("model.logit_softcap > 0 has no standard architecture to export to")
    if cfg.bigram_embedding:
        raise UserError(
            "model.bigram_embedding=True (a bigram table) has no standard architecture to export to"
        )
    if cfg.position == "learned":
        if cfg.norm == "rmsnorm":
            raise UserError(
                "model.norm='rmsnorm' with model.position='learned' has no standard "
                "architecture to export to"
            )
        return "gpt2"
    return "gpt_neox" if cfg.norm == "layernorm" else "arcee"


def hf_config(cfg: models.TransformerConfig) -> dict:
    """config.json of the architecture `cfg` exports as."""
    arch = architecture(cfg)
    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
    }
    if arch == "gpt2":
        return common | {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": cfg.context_length,
            "n_embd": cfg.embedding_dim,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.hidden_dim,
            "activation_function": ACTIVATIONS[cfg.activation],
            "layer_norm_epsilon": NORM_EPS,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    rope = {"rope_type": "default", "rope_theta": ROPE_BASE}
    shared = common | {
        "architectures": ["GPTNeoXForCausalLM" if arch == "gpt_neox" else "ArceeForCausalLM"],
        "model_type": arch,
        "hidden_size": cfg.embedding_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": ACTIVATIONS[cfg.activation],
        "max_position_embeddings": cfg.context_length,
        "attention_bias": cfg.use_bias,
        "rope_parameters": rope,
    }
    if arch == "gpt_neox":  # the rotary keys of older readers too
        return shared | {
            "layer_norm_eps": NORM_EPS,
            "use_parallel_residual": False,
            "rotary_pct": 1.0,
            "rotary_emb_base": ROPE_BASE,
        }
    return shared | {
        "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": NORM_EPS,
        "mlp_bias": cfg.use_bias,
        "rope_theta": ROPE_BASE,
    }


def _array(variable) -> np.ndarray:
    return np.asarray(variable[...], dtype=np.float32)


def _bias(module, size: int) -> np.ndarray:
    """A Linear's or norm's bias, zeros where it has none."""
    return np.zeros(size, np.float32) if module.bias is None else _array(module.bias)


def _norm(prefix: str, norm, with_bias: bool = True) -> dict[str, np.ndarray]:
    out = {f"{prefix}.weight": _array(norm.scale)}
    if with_bias:
        out[f"{prefix}.bias"] = _bias(norm, out[f"{prefix}.weight"].size)
    return out


def _linear(prefix: str, layer, transpose: bool, with_bias: bool = True) -> dict[str, np.ndarray]:
    """A Linear as nn.Linear (`transpose`: weight (out, in)) or GPT-2's Conv1D (in, out)."""
    kernel = _array(layer.kernel)
    out = {f"{prefix}.weight": np.ascontiguousarray(kernel.T if transpose else kernel)}
    if with_bias:
        out[f"{prefix}.bias"] = _bias(layer, kernel.shape[1])
    return out


def _gpt2_weights(model: models.Transformer) -> dict[str, np.ndarray]:
    weights = {
        "transformer.wte.weight": _array(model.embed.embedding),
        "transformer.wpe.weight": _array(model.pos_embed.embedding),
        **_norm("transformer.ln_f", model.final_norm),
    }
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}"
        weights |= _norm(f"{p}.ln_1", block.attn_norm) | _norm(f"{p}.ln_2", block.mlp_norm)
        weights |= _linear(f"{p}.attn.c_attn", block.attn.qkv, transpose=False)
        weights |= _linear(f"{p}.attn.c_proj", block.attn.out, transpose=False)
        weights |= _linear(f"{p}.mlp.c_fc", block.mlp.up, transpose=False)
        weights |= _linear(f"{p}.mlp.c_proj", block.mlp.down, transpose=False)
    return weights


def _neox_weights(model: models.Transformer) -> dict[str, np.ndarray]:
    cfg = model.cfg
    weights = {
        "gpt_neox.embed_in.weight": _array(model.embed.embedding),
        **_norm("gpt_neox.final_layer_norm", model.final_norm),
    }
    for i, block in enumerate(model.blocks):
        p = f"gpt_neox.layers.{i}"
        weights |= _norm(f"{p}.input_layernorm", block.attn_norm)
        weights |= _norm(f"{p}.post_attention_layernorm", block.mlp_norm)
        qkv = _linear(f"{p}.attention.query_key_value", block.attn.qkv, True, cfg.use_bias)
        # Ours are (q, k, v) x heads; GPT-NeoX's heads x (q, k, v).
        shape = (3, cfg.num_heads, cfg.head_dim, -1)
        weights |= {
            k: np.ascontiguousarray(v.reshape(shape).swapaxes(0, 1).reshape(v.shape))
            for k, v in qkv.items()
        }
        weights |= _linear(f"{p}.attention.dense", block.attn.out, True, cfg.use_bias)
        weights |= _linear(f"{p}.mlp.dense_h_to_4h", block.mlp.up, transpose=True)
        weights |= _linear(f"{p}.mlp.dense_4h_to_h", block.mlp.down, transpose=True)
    return weights


def _arcee_weights(model: models.Transformer) -> dict[str, np.ndarray]:
    cfg, bias = model.cfg, model.cfg.use_bias
    weights = {
        "model.embed_tokens.weight": _array(model.embed.embedding),
        **_norm("model.norm", model.final_norm, with_bias=False),
    }
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}"
        weights |= _norm(f"{p}.input_layernorm", block.attn_norm, with_bias=False)
        weights |= _norm(f"{p}.post_attention_layernorm", block.mlp_norm, with_bias=False)
        qkv = _linear("qkv", block.attn.qkv, True, bias)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(j * cfg.embedding_dim, (j + 1) * cfg.embedding_dim)
            weights |= {
                k.replace("qkv", f"{p}.self_attn.{name}"): np.ascontiguousarray(v[rows])
                for k, v in qkv.items()
            }
        weights |= _linear(f"{p}.self_attn.o_proj", block.attn.out, True, bias)
        weights |= _linear(f"{p}.mlp.up_proj", block.mlp.up, True, bias)
        weights |= _linear(f"{p}.mlp.down_proj", block.mlp.down, True, bias)
    return weights


WEIGHTS = {"gpt2": _gpt2_weights, "gpt_neox": _neox_weights, "arcee": _arcee_weights}
HEADS = {"gpt2": "lm_head.weight", "gpt_neox": "embed_out.weight", "arcee": "lm_head.weight"}


def hf_weights(model: models.Transformer) -> dict[str, np.ndarray]:
    """The model's parameters under the names of the architecture it exports as."""
    arch = architecture(model.cfg)
    weights = WEIGHTS[arch](model)
    if model.head is not None:  # an own head; a tied one is the token embedding there too
        weights[HEADS[arch]] = np.ascontiguousarray(_array(model.head.kernel).T)
    return weights


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def export(workdir: str | Path, out: str | Path, checkpoint: str | int = "best") -> Path:
    """Writes the model of `workdir`'s `checkpoint` ("best", "latest" or a step) as a
    Hugging Face model folder `out`, which must be new or empty. Returns `out`."""
    workdir, out = Path(workdir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory")
    if checkpoint not in ("best", "latest") and not isinstance(checkpoint, int):
        raise UserError(f"checkpoint must be 'best', 'latest' or a step, got {checkpoint!r}")
    tokenizer = load_tokenizer(workdir / checkpoints.TOKENIZER_FILE)
    cfg = models.model_config(checkpoints.read_run_config(workdir), tokenizer.vocab_size)
    architecture(cfg)  # before loading any weights
    model, _, _ = loader.load_model(workdir, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_weights(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", hf_config(cfg))
    _write_json(out / "generation_config.json", {"max_length": cfg.context_length})
    hf_tokenizer.save(tokenizer, out / "tokenizer.json")
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,  # it would drop spaces before punctuation
            "model_max_length": cfg.context_length,
        },
    )
    return out
