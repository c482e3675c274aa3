"""The PyTorch peer for experiments/benchmark.py: a nanoGPT-shaped GPT train step in eager
PyTorch (fused SDPA attention, AdamW, gradient clipping, nanoGPT's batch sampling), timed
the same way: compile/warm-up excluded, median of per-step times.

PyTorch is not a dependency of charlm-jax: install it in a separate environment, e.g.
    python -m venv /tmp/torch && /tmp/torch/bin/pip install torch numpy
    /tmp/torch/bin/python experiments/pytorch_peer.py --preset=nanogpt_baby
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
    "nanogpt_baby": dict(dim=128, layers=4, heads=4, context=64, batch=12, dropout=0.0),
    "nanogpt": dict(dim=384, layers=6, heads=6, context=256, batch=64, dropout=0.2),
}
TEXT = Path(__file__).resolve().parents[1] / "charlm_jax" / "resources" / "tinyshakespeare.txt"


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.up, self.down = (
            nn.Linear(dim, 4 * dim, bias=False),
            nn.Linear(4 * dim, dim, bias=False),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, 2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh")))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int, dropout: float):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
        for block in self.blocks:
            for w in (block.proj.weight, block.down.weight):
                nn.init.normal_(w, 0.0, 0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))
        for block in self.blocks:
            x = block(x)
        logits = self.ln(x) @ self.tok.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="nanogpt_baby")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    p = PRESETS[args.preset]

    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text[: len(text) * 9 // 10]][:200_000])
    torch.manual_seed(0)
    model = GPT(len(chars), p["dim"], p["layers"], p["heads"], p["context"], p["dropout"])
    matrices = [w for w in model.parameters() if w.dim() >= 2]
    vectors = [w for w in model.parameters() if w.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99),
    )  # fmt: skip

    def step() -> None:
        starts = torch.randint(len(data) - p["context"], (p["batch"],))
        x = torch.stack([data[i : i + p["context"]] for i in starts])
        y = torch.stack([data[i + 1 : i + 1 + p["context"]] for i in starts])
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens = p["batch"] * p["context"]
    print(
        f"pytorch {torch.__version__} {args.preset} ({torch.get_num_threads()} threads): "
        f"{1e3 * median:.1f} ms/step (min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f}), "
        f"{tokens / median:,.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
