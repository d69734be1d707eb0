"""Baseline trainer: a byte-level GPT with rotary position embeddings and byte-history embeddings.

This is the file the agent edits. It imports the fixed `prepare` module,
trains until TIME_BUDGET, calls evaluate_bpb once, and prints one JSON line
on stdout. Progress goes to stderr.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, TIME_BUDGET, VOCAB_SIZE, evaluate_bpb, make_dataloader

# ---------------------------------------------------------------------------
# Settings: one per line, so one idea is a one-line edit
# ---------------------------------------------------------------------------
d_model = 80              # embedding width
n_heads = 4               # attention heads (d_model must divide by it)
n_layers = 3              # transformer blocks
d_ff = 256                # feed-forward width
rope_theta = 100.0        # base of the rotary position embedding
n_history = 3             # embeddings of the previous k bytes added to the token embedding
batch_size = 8            # rows of MAX_SEQ_LEN bytes per step
seq_len = MAX_SEQ_LEN     # training context (<= MAX_SEQ_LEN)
learning_rate = 3e-3      # peak AdamW learning rate
lr_schedule = "constant"  # after warm-up: "constant", "linear" (to 0 at TIME_BUDGET), "cosine" or "warmdown"
warmdown_frac = 0.4       # "warmdown": constant, then linear to 0 over this last share of TIME_BUDGET
warmup_steps = 20         # linear warm-up steps
weight_decay = 0.1        # applied to matrices only
beta1 = 0.9               # AdamW beta1
beta2 = 0.95              # AdamW beta2
grad_clip = 1.0           # max gradient norm (0 disables)
dropout = 0.0             # dropout on attention output and MLP
data_order = "stream"     # batches: "stream" (make_dataloader's rows, in order) or "random" (windows at random offsets)
norm = "layernorm"        # "layernorm" or "rmsnorm" (no mean, no bias: a little cheaper)
activation = "gelu"       # MLP: "gelu", "relu2" (squared ReLU) or "swiglu" (gated, d_ff gates and d_ff values)
tie_embeddings = True     # True: the output head reuses the token embedding; False: a head of its own
optimizer = "adamw"       # "adamw", or "muon": orthogonalised momentum for the blocks' matrices, AdamW for the rest
muon_lr = 0.02            # peak Muon learning rate (optimizer = "muon")
seed = int(os.environ.get("TORCH_SEED", "42"))

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(seed)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
def rotary_tables(T, head_dim, theta, dev):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=dev).float() / head_dim))
    angles = torch.outer(torch.arange(T, device=dev).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, n_heads, C // n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)), dropout, self.training)


def Norm():
    return nn.RMSNorm(d_model) if norm == "rmsnorm" else nn.LayerNorm(d_model)


def mlp_activation(h):
    if activation == "swiglu":
        gate, value = h.chunk(2, dim=-1)
        return F.silu(gate) * value
    if activation == "relu2":
        return F.relu(h).square()
    return F.gelu(h)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = Norm()
        self.attn = Attention()
        self.ln2 = Norm()
        self.fc = nn.Linear(d_model, 2 * d_ff if activation == "swiglu" else d_ff)
        self.out = nn.Linear(d_ff, d_model)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln1(x), cos, sin)
        return x + F.dropout(self.out(mlp_activation(self.fc(self.ln2(x)))), dropout, self.training)


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB_SIZE, d_model)
        # history[k-1] embeds the byte k positions back (causal: only the past is seen)
        self.history = nn.ModuleList(nn.Embedding(VOCAB_SIZE, d_model) for _ in range(n_history))
        self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
        self.ln_f = Norm()
        self.head = nn.Linear(d_model, VOCAB_SIZE, bias=False)
        if tie_embeddings:
            self.head.weight = self.tok_emb.weight  # tied input/output embeddings
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        h = self.tok_emb(idx)
        for k, emb in enumerate(self.history, start=1):
            h = h + emb(F.pad(idx, (k, 0))[:, :T])  # shifted right by k, zeros (BOS) in front
        cos, sin = rotary_tables(T, d_model // n_heads, rope_theta, idx.device)
        for block in self.blocks:
            h = block(h, cos, sin)
        logits = self.head(self.ln_f(h))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, VOCAB_SIZE), targets.reshape(-1))


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def lr_at(peak, step, progress):
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if lr_schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    if lr_schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if lr_schedule == "warmdown":
        return peak * min(1.0, max(0.0, 1.0 - progress) / warmdown_frac)
    return peak


def orthogonalise(g, steps=5):
    """Newton-Schulz iteration towards the nearest semi-orthogonal matrix (Muon; Jordan et al., 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update of each matrix is orthogonalised."""

    def __init__(self, params, lr, momentum=0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = orthogonalise(p.grad.add(buf, alpha=group["momentum"]))
                p.add_(update, alpha=-group["lr"] * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)


def make_optimizers(model):
    """One optimizer, or Muon for the blocks' matrices and AdamW for embeddings, head and vectors."""
    block_matrices = [p for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2]
    muon = block_matrices if optimizer == "muon" else []
    rest = [p for p in model.parameters() if all(p is not q for q in muon)]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate, betas=(beta1, beta2),
    )
    for group in adamw.param_groups:
        group["peak_lr"] = learning_rate
    if not muon:
        return [adamw]
    return [adamw, Muon([{"params": muon, "peak_lr": muon_lr}], lr=muon_lr)]


def random_windows(B, T):
    """Rows of BOS + T bytes starting at uniformly random offsets of the train split."""
    from prepare import BOS_TOKEN, load_split  # imported here: a script using only the stream needs neither
    data = load_split("train")
    offsets = torch.arange(T)
    while True:
        starts = torch.randint(0, len(data) - T, (B, 1))
        rows = torch.empty((B, T + 1), dtype=torch.long)
        rows[:, 0] = BOS_TOKEN
        rows[:, 1:] = data[starts + offsets].long()
        yield rows[:, :-1].to(device), rows[:, 1:].to(device)


def main():
    model = GPT().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizers = make_optimizers(model)
    if data_order == "random":
        loader = random_windows(batch_size, seq_len)
    else:
        loader = make_dataloader(batch_size, seq_len, "train", device)
    print(f"params {n_params:,} | device {device} | budget {TIME_BUDGET}s", file=sys.stderr)

    model.train()
    start = time.time()
    step, loss_value = 0, float("nan")
    while (elapsed := time.time() - start) < TIME_BUDGET:
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr_at(group["peak_lr"], step, elapsed / TIME_BUDGET)
        x, y = next(loader)
        loss = model(x, y)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        for opt in optimizers:
            opt.step()
        step += 1
        if step % 100 == 0:
            loss_value = loss.item()
            tok_s = step * batch_size * seq_len / (time.time() - start)
            print(f"step {step} | loss {loss_value:.4f} | tok/s {tok_s:.0f} | {elapsed:.0f}s", file=sys.stderr)
    training_time = time.time() - start
    loss_value = loss.item() if step else float("nan")

    val_bpb = evaluate_bpb(model, batch_size, device)
    print(json.dumps({
        "val_bpb": round(val_bpb, 6),
        "train_loss": round(loss_value, 6) if step else None,
        "total_steps": step,
        "num_params_M": round(n_params / 1e6, 4),
        "training_time_secs": round(training_time, 2),
    }))


if __name__ == "__main__":
    main()
