"""A PyTorch reimplementation of nanoGPT's model (not nanoGPT itself) with a KV-cache decode
loop, which nanoGPT does not have (its sample.py recomputes the whole context per token):
the peer of experiments/benchmark_sampling.py. For training, the peer is nanoGPT's own
train.py (experiments/nanogpt_peer.py).

`decode`: batch --decode_batch, a one-token prompt, --new_tokens per row, the cache written
in place, F.scaled_dot_product_attention, torch.inference_mode; prints the median tokens/s
of --repeats runs after a warm-up.

PyTorch is not a dependency of charlm-jax: install it in a separate environment, e.g.
    python -m venv /tmp/torch && /tmp/torch/bin/pip install torch numpy
    /tmp/torch/bin/python experiments/pytorch_peer.py --preset=nanogpt_baby --decode_batch=16
"""

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The same shapes as configs/transformer.py's presets of these names.
PRESETS = {
    "nanogpt_baby": dict(dim=128, layers=4, heads=4, context=64),
    "nanogpt": dict(dim=384, layers=6, heads=6, context=256),
}
TEXT = Path(__file__).resolve().parents[1] / "charlm_jax" / "resources" / "tinyshakespeare.txt"


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.up, self.down = (
            nn.Linear(dim, 4 * dim, bias=False),
            nn.Linear(4 * dim, dim, bias=False),
        )

    def forward(self, x: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        """x (b, t, d). With `cache` (keys, values of (b, heads, context, head_dim)), the new
        keys and values are written in place at start..start+t-1 and attend over the cache up
        to them (t > 1: a prefill from 0, causal; t == 1: one new token sees them all)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, 2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            cache[0][:, :, start : start + t], cache[1][:, :, start : start + t] = k, v
            k, v = cache[0][:, :, : start + t], cache[1][:, :, : start + t]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))  # as charlm-jax


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
        for block in self.blocks:
            for w in (block.proj.weight, block.down.weight):
                nn.init.normal_(w, 0.0, 0.02 / math.sqrt(2 * layers))

    def logits(self, idx: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        """Logits of idx (b, t) at positions start..; `cache`: one (keys, values) per block."""
        x = self.tok(idx) + self.pos(torch.arange(start, start + idx.shape[1]))
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i], start)
        return self.ln(x) @ self.tok.weight.T


@torch.inference_mode()
def decode(model: GPT, batch: int, new_tokens: int, p: dict) -> torch.Tensor:
    """Samples `new_tokens` per row at temperature 1 from a one-token prompt with a KV cache
    written in place; when the text fills the context, the oldest half is dropped and the
    cache rebuilt from the rest (charlm-jax's policy)."""
    context, head_dim = p["context"], p["dim"] // p["heads"]
    shape = (batch, p["heads"], context, head_dim)
    cache = [(torch.zeros(shape), torch.zeros(shape)) for _ in model.blocks]
    window = torch.zeros((batch, context), dtype=torch.long)
    length = 1
    logits = model.logits(window[:, :1], cache)[:, -1]
    out = torch.empty((batch, new_tokens), dtype=torch.long)
    for i in range(new_tokens):
        token = torch.multinomial(F.softmax(logits, -1), 1)
        out[:, i : i + 1] = token
        if length == context:  # rebuild from the newest half and the new token
            keep = context - context // 2
            window[:, :keep] = window[:, context // 2 :].clone()
            window[:, keep : keep + 1] = token
            length = keep + 1
            logits = model.logits(window[:, :length], cache)[:, -1]
        else:
            window[:, length : length + 1] = token
            logits = model.logits(token, cache, length)[:, -1]
            length += 1
    return out


def time_decode(model: GPT, p: dict, batch: int, new_tokens: int, repeats: int) -> float:
    """Median tokens/s of `decode` over `repeats` runs after one warm-up run."""
    decode(model, batch, min(new_tokens, 8), p)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode(model, batch, new_tokens, p)
        times.append(time.perf_counter() - start)
    return batch * new_tokens / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="nanogpt_baby")
    parser.add_argument("--decode_batch", type=int, default=1, help="rows decoded at once")
    parser.add_argument("--new_tokens", type=int, default=200, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    vocab = len(set(TEXT.read_text(encoding="utf-8")))
    torch.manual_seed(args.seed)
    model = GPT(vocab, p["dim"], p["layers"], p["heads"], p["context"])
    rate = time_decode(model, p, args.decode_batch, args.new_tokens, args.repeats)
    print(
        f"pytorch {torch.__version__} {args.preset} decode ({torch.get_num_threads()} "
        f"threads): batch {args.decode_batch}, {args.new_tokens} tokens per row: "
        f"{rate:,.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
