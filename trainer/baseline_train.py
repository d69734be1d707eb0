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
lr_schedule = "constant"  # after warm-up: "constant", "linear" (to 0 at TIME_BUDGET) or "cosine"
warmup_steps = 20         # linear warm-up steps
weight_decay = 0.1        # applied to matrices only
beta1 = 0.9               # AdamW beta1
beta2 = 0.95              # AdamW beta2
grad_clip = 1.0           # max gradient norm (0 disables)
dropout = 0.0             # dropout on attention output and MLP
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


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention()
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_ff)
        self.out = nn.Linear(d_ff, d_model)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln1(x), cos, sin)
        return x + F.dropout(self.out(F.gelu(self.fc(self.ln2(x)))), dropout, self.training)


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB_SIZE, d_model)
        # history[k-1] embeds the byte k positions back (causal: only the past is seen)
        self.history = nn.ModuleList(nn.Embedding(VOCAB_SIZE, d_model) for _ in range(n_history))
        self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB_SIZE, bias=False)
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
def lr_at(step, progress):
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if lr_schedule == "linear":
        return learning_rate * max(0.0, 1.0 - progress)
    if lr_schedule == "cosine":
        return learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return learning_rate


def main():
    model = GPT().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate, betas=(beta1, beta2),
    )
    loader = make_dataloader(batch_size, seq_len, "train", device)
    print(f"params {n_params:,} | device {device} | budget {TIME_BUDGET}s", file=sys.stderr)

    model.train()
    start = time.time()
    step, loss_value = 0, float("nan")
    while (elapsed := time.time() - start) < TIME_BUDGET:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, elapsed / TIME_BUDGET)
        x, y = next(loader)
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
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
