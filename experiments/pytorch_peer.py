"""The PyTorch peer for experiments/benchmark.py: a nanoGPT-shaped GPT train step in eager
PyTorch (fused SDPA attention, AdamW, gradient clipping, nanoGPT's batch sampling), timed
the same way: compile/warm-up excluded, median of per-step times.

With --decode_batch=B it instead times KV-cache decoding (`decode`: batch B, a one-token
prompt, --new_tokens per row, the cache written in place, F.scaled_dot_product_attention,
torch.inference_mode) for experiments/benchmark_sampling.py.

With --train_steps=N it instead trains a full nanoGPT run (nanoGPT's learning-rate schedule,
its evaluation of 20 random batches every 250 steps, keeping the best) and also scores the
whole validation text in back-to-back windows of the context, as charlm-jax's scorer does
with stride = context (`charlm_jax.model.scoring`), so its losses compare with a charlm-jax
run's (experiments/quality_parity.py drives both).

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
    def __init__(self, dim: int, heads: int, dropout: float, gelu: str):
        super().__init__()
        self.heads, self.dropout, self.gelu = heads, dropout, gelu
        self.ln1, self.ln2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.up, self.down = (
            nn.Linear(dim, 4 * dim, bias=False),
            nn.Linear(4 * dim, dim, bias=False),
        )
        self.drop = nn.Dropout(dropout)

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
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=t > 1, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.down(F.gelu(self.up(self.ln2(x)), approximate=self.gelu)))


class GPT(nn.Module):
    def __init__(
        self, vocab: int, dim: int, layers: int, heads: int, context: int, dropout: float,
        gelu: str = "tanh",
    ):  # fmt: skip
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout, gelu) for _ in range(layers))
        self.ln = nn.LayerNorm(dim, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
        for block in self.blocks:
            for w in (block.proj.weight, block.down.weight):
                nn.init.normal_(w, 0.0, 0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the next-token predictions."""
        return F.cross_entropy(self.logits(idx).flatten(0, 1), targets.flatten())

    def logits(self, idx: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        """Logits of idx (b, t) at positions start..; `cache`: one (keys, values) per block."""
        x = self.drop(self.tok(idx) + self.pos(torch.arange(start, start + idx.shape[1])))
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
    model.eval()
    decode(model, batch, min(new_tokens, 8), p)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode(model, batch, new_tokens, p)
        times.append(time.perf_counter() - start)
    return batch * new_tokens / statistics.median(times)


def nanogpt_lr(step: int, steps: int, peak=1e-3, minimum=1e-4, warmup=100) -> float:
    """nanoGPT's get_lr: linear warmup, then cosine decay to `minimum` at `steps`."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    ratio = (step - warmup) / (steps - warmup)
    return minimum + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - minimum)


@torch.no_grad()
def windowed_loss(model: GPT, data: torch.Tensor, context: int) -> float:
    """Mean loss over every token of `data` after the first, scored in consecutive
    non-overlapping windows of `context` (the last one shorter)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data) - 1, context):
        window = data[start : start + context + 1]
        loss = model(window[None, :-1], window[None, 1:])
        total += float(loss) * (len(window) - 1)
        count += len(window) - 1
    model.train()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="nanogpt_baby")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--train_steps", type=int, default=0, help="> 0: a full training run")
    parser.add_argument("--decode_batch", type=int, default=0, help="> 0: time KV-cache decoding")
    parser.add_argument("--new_tokens", type=int, default=200, help="decoding: tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="decoding: timed runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gelu",
        choices=("tanh", "none"),
        default="tanh",
        help="GELU approximation: tanh (as charlm-jax) or none (nanoGPT's exact)",
    )
    args = parser.parse_args()
    p = PRESETS[args.preset]

    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    n_train = int(len(ids) * 0.9)
    data, val = ids[:n_train], ids[n_train:]
    if not args.train_steps:
        data = data[:200_000]
    torch.manual_seed(args.seed)
    model = GPT(
        len(chars), p["dim"], p["layers"], p["heads"], p["context"], p["dropout"], args.gelu
    )
    matrices = [w for w in model.parameters() if w.dim() >= 2]
    vectors = [w for w in model.parameters() if w.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99),
    )  # fmt: skip

    def batch(split: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(split) - p["context"], (p["batch"],))
        x = torch.stack([split[i : i + p["context"]] for i in starts])
        y = torch.stack([split[i + 1 : i + 1 + p["context"]] for i in starts])
        return x, y

    def step() -> None:
        loss = model(*batch(data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    if args.train_steps:
        train(args, model, opt, step, batch, val, p["context"])
        return
    if args.decode_batch:
        rate = time_decode(model, p, args.decode_batch, args.new_tokens, args.repeats)
        print(
            f"pytorch {torch.__version__} {args.preset} decode ({torch.get_num_threads()} "
            f"threads): batch {args.decode_batch}, {args.new_tokens} tokens per row: "
            f"{rate:,.0f} tokens/s"
        )
        return
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


def train(args, model, opt, step, batch, val: torch.Tensor, context: int) -> None:
    """nanoGPT's training loop: evaluation of 20 random validation batches every 250 steps
    (and at the end), best kept; then the windowed loss of the whole validation text."""
    best = math.inf
    start = time.perf_counter()
    for i in range(args.train_steps + 1):
        if i % 250 == 0 or i == args.train_steps:
            model.eval()
            with torch.no_grad():
                val_loss = sum(float(model(*batch(val))) for _ in range(20)) / 20
            model.train()
            best = min(best, val_loss)
            print(f"step {i}: val loss {val_loss:.4f}", flush=True)
        if i == args.train_steps:
            break
        for group in opt.param_groups:
            group["lr"] = nanogpt_lr(i, args.train_steps)
        step()
    wall = time.perf_counter() - start
    full = windowed_loss(model, val, context)
    print(
        f"pytorch {args.preset} seed {args.seed} gelu {args.gelu}: best val {best:.4f} "
        f"(20 random batches), whole val text {full:.4f}, {wall:.0f} s"
    )


if __name__ == "__main__":
    main()
