"""CPU training speed: `phigen train` vs PyTorch `PhiForCausalLM`, same config, fp32, same threads,
same run.

    python benches/train_bench.py [--bin target/release/phigen] [--steps 12] [--layers 4] [--hidden 256]

One step = forward + backward + clip + AdamW on micro_batch × seq_len tokens (no accumulation).
The config (phi layout, GPT-2 vocabulary padded to 50,304) is written once as config.json; phigen
trains it through a recipe on token shards of random ids, PyTorch trains the same config on random
ids of the same shape with `torch.optim.AdamW`. Each side's tokens/s is the median step after two
warm-up steps; the first losses must both be ≈ ln(vocab) (same work from the same init scale).
Interleaved A/B, best of --rounds; prints `uptime`. Needs `pip install torch transformers numpy`.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch
from transformers import PhiConfig, PhiForCausalLM



def write_run(tmp, cfg_dir, n, seq, batch, steps, extra=""):
    """Token shards of `n` random ids in phigen's format (32-byte header, then uint16) under
    `tmp/tok`, and a one-stage recipe over them (lr 1e-3, weight decay 0.1, no eval or checkpoint
    during the run, `extra` lines appended); returns the recipe's path."""
    tok = os.path.join(tmp, "tok")
    os.makedirs(tok)
    ids = np.random.default_rng(0).integers(0, 50257, n, dtype=np.uint16)
    with open(os.path.join(tok, "train-00000.bin"), "wb") as f:
        f.write(b"PHIGTOKS" + (1).to_bytes(4, "little") + (2).to_bytes(4, "little")
                + n.to_bytes(8, "little") + (1).to_bytes(8, "little"))
        ids.tofile(f)
    meta = {"format_version": 1, "tokenizer": "gpt2", "vocab_size": 50257, "end_of_text": 50256,
            "token_width": "u16", "val_fraction": 0.0, "sources": [],
            "splits": {"train": {"documents": 1, "tokens": n, "shards": ["train-00000.bin"]},
                       "val": {"documents": 0, "tokens": 0, "shards": []}}}
    json.dump(meta, open(os.path.join(tok, "meta.json"), "w"))
    recipe = os.path.join(tmp, "bench.toml")
    open(recipe, "w").write(f"""
name = "bench"
[model]
config = "{cfg_dir}"
[[stage]]
name = "s"
data = [{{ path = "{tok}" }}]
seq_len = {seq}
micro_batch = {batch}
steps = {steps}
lr = 1e-3
weight_decay = 0.1
eval_every = {steps * 10}
checkpoint_every = {steps * 10}
{extra}""")
    return recipe


def torch_adamw(model, **options):
    """`torch.optim.AdamW` with phigen's recipe defaults: lr 1e-3, betas (0.9, 0.95), weight decay
    0.1 on matrices other than the embedding, none elsewhere."""
    decays = lambda n, p: p.dim() >= 2 and "embed_tokens" not in n
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    rest = [p for n, p in model.named_parameters() if not decays(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-3, betas=(0.9, 0.95), **options)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/phigen")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = 50304
    cfg = PhiConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                    num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                    max_position_embeddings=max(2048, args.seq), partial_rotary_factor=0.5,
                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = os.path.join(tmp, "config")
        cfg.save_pretrained(cfg_dir)
        recipe = write_run(tmp, cfg_dir, 2_000_000, args.seq, args.batch, args.steps)

        def phigen():
            out = os.path.join(tmp, "run")
            subprocess.run(["rm", "-rf", out])
            env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
            subprocess.run([args.bin, "--quiet", "train", "--recipe", recipe, "--out", out], check=True, env=env)
            rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if "train_loss" in l]
            return statistics.median(r["tokens_per_sec"] for r in rows[2:]), rows[0]["train_loss"]

        def pytorch():
            torch.manual_seed(0)
            model = PhiForCausalLM(cfg).train()
            opt = torch_adamw(model)
            speeds, first = [], None
            for _ in range(args.steps):
                batch = torch.randint(0, 50257, (args.batch, args.seq + 1))
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                speeds.append(args.batch * args.seq / (time.perf_counter() - t))
                first = first if first is not None else loss.item()
            return statistics.median(speeds[2:]), first

        ph, pt = (0.0, None), (0.0, None)
        for _ in range(args.rounds):
            ph = max(ph, phigen(), key=lambda x: x[0])
            pt = max(pt, pytorch(), key=lambda x: x[0])
        params = sum(p.numel() for p in PhiForCausalLM(cfg).parameters())
        print(f"phi config: {args.layers} layers, d {args.hidden}, vocab {vocab}, {params / 1e6:.1f}M parameters; "
              f"batch {args.batch} × seq {args.seq}; fp32; {args.threads} threads")
        print(f"phigen train   {ph[0]:8.0f} tok/s   first loss {ph[1]:.3f}")
        print(f"PyTorch        {pt[0]:8.0f} tok/s   first loss {pt[1]:.3f}   (torch {torch.__version__})")
        print(f"ratio          {ph[0] / pt[0]:8.2f}x   (ln vocab = {math.log(vocab):.3f})")
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
