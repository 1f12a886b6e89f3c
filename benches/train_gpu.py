"""GPU training throughput: `phigen train --device cuda` vs PyTorch `PhiForCausalLM`, same config,
same batch, bf16 compute with fp32 master weights, same GPU, same run.

    python benches/train_gpu.py --bin target-cuda/release/phigen [--preset phi-1-small] [--seq 2048]
                                [--batch 4] [--steps 20] [--no-compile]

The config comes from `phigen init --preset` (its config.json is what PyTorch loads, so both sides
train the same shapes). phigen trains it through a recipe on token shards of random ids; PyTorch
trains the same config on random ids of the same shape under `torch.autocast(bfloat16)` with fused
AdamW, in eager mode (SDPA attention) and with `torch.compile`. One step = forward + backward +
clip + AdamW on batch × seq tokens. Each side's tokens/s is the median step after three warm-up
steps; MFU = tokens/s × (6N + 12·L·T·H·D) / peak (phigen's formula, N without the untied
embedding); peak memory is the largest `nvidia-smi` memory.used seen while that side ran, less
what was used before it started (so it includes each process's CUDA context). Run it on a GPU
machine where nothing else runs; needs torch, transformers and numpy.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time

import torch
from transformers import PhiConfig, PhiForCausalLM

from train_bench import torch_adamw, write_run  # benches/ is on sys.path when run as a script

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def gpu_memory_used_mib():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


class PeakMemory:
    """Polls nvidia-smi every 50 ms while a side runs."""

    def __enter__(self):
        self.base = gpu_memory_used_mib()
        self.peak = self.base
        self.stop = False
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while not self.stop:
            self.peak = max(self.peak, gpu_memory_used_mib())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()

    @property
    def gib(self):
        return (self.peak - self.base) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target-cuda/release/phigen")
    ap.add_argument("--preset", default="phi-1-small")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--sides", default="phigen,eager,compile")
    args = ap.parse_args()
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    sides = args.sides.split(",")
    if args.no_compile and "compile" in sides:
        sides.remove("compile")
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = os.path.join(tmp, "init")
        subprocess.run([args.bin, "--quiet", "init", "--preset", args.preset, "--out", cfg_dir], check=True)
        cfg = PhiConfig.from_pretrained(cfg_dir)
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attention_dropout = 0.0
        vocab = cfg.vocab_size
        n_params = sum(p.numel() for p in PhiForCausalLM(cfg).parameters())
        n_flops = n_params - (0 if cfg.tie_word_embeddings else vocab * cfg.hidden_size)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        flops = 6.0 * n_flops + 12.0 * cfg.num_hidden_layers * args.seq * cfg.num_attention_heads * head_dim

        recipe = write_run(tmp, cfg_dir, 4_000_000, args.seq, args.batch, args.steps, "dropout = 0.0\n")
        results = {}

        def phigen():
            out = os.path.join(tmp, "run")
            cmd = [args.bin, "--quiet", "train", "--recipe", recipe, "--out", out, "--device", "cuda",
                   "--dtype", "bf16"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                return None, r.stderr.strip()[-600:]
            rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if "train_loss" in l]
            return statistics.median(r["tokens_per_sec"] for r in rows[3:]), rows[0]["train_loss"]

        def pytorch(compiled):
            torch.manual_seed(0)
            model = PhiForCausalLM._from_config(cfg, attn_implementation="sdpa").cuda().train()
            opt = torch_adamw(model, fused=True)
            fwd = torch.compile(model) if compiled else model
            speeds, first = [], None
            try:
                for _ in range(args.steps):
                    batch = torch.randint(0, 50257, (args.batch, args.seq + 1), device="cuda")
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = fwd(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    torch.cuda.synchronize()
                    speeds.append(args.batch * args.seq / (time.perf_counter() - t))
                    first = first if first is not None else loss.item()
            except torch.OutOfMemoryError as e:
                return None, f"out of memory: {str(e)[:200]}"
            finally:
                del model, opt, fwd
                torch.cuda.empty_cache()
            return statistics.median(speeds[3:]), first

        for side in sides:
            with PeakMemory() as mem:
                if side == "phigen":
                    r = phigen()
                else:
                    r = pytorch(side == "compile")
            results[side] = (r, mem.gib)

        print(f"{name}; {args.preset}: {n_params / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, "
              f"d {cfg.hidden_size}, vocab {vocab}; batch {args.batch} × seq {args.seq}; bf16 compute, "
              f"fp32 masters; peak {peak} TFLOP/s; torch {torch.__version__}")
        base = results.get("eager", ((None, None), 0))[0][0]
        for side, ((tps, info), gib) in results.items():
            if tps is None:
                print(f"{side:8s} failed: {info}")
                continue
            mfu = f"{100 * tps * flops / (peak * 1e12):5.1f}%" if peak else "  n/a"
            ratio = f"{tps / base:5.2f}x eager" if base else ""
            print(f"{side:8s} {tps:9.0f} tok/s  MFU {mfu}  peak mem {gib:6.1f} GiB  first loss {info:.3f}  {ratio}")


if __name__ == "__main__":
    main()
