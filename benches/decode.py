"""CPU decode speed: phigen vs transformers `generate`, same checkpoint, same run.

    python benches/decode.py [--bin target/release/phigen] [--preset phi-1-small] [--new 256]

Needs torch + transformers (a throw-away venv; see ../shared/benchmarks.md). Steps:
1. `phigen init` writes a random-init checkpoint (fp32);
2. transformers loads that directory with `from_pretrained` (no conversion) and runs greedy
   `generate` (batch 1, KV cache) with as many threads as phigen uses;
3. `phigen sample --prompt-ids … --greedy` does the same; interleaved A/B/A/B, best of --rounds;
4. read bandwidth is measured with torch (sum over a 1 GiB tensor of random values) right before
   and right after each phigen run (this VM's bandwidth drifts between 17 and 60 GB/s from day to
   day and minute to minute), and the roofline is bytes read per token ÷ the higher of the two.
   A token reads every weight once except the input embedding table, of which it reads one row
   (when the head is tied to the table, the head reads it all, and it counts).
Prints both speeds, the ratio, the share of the roofline (best round and every round), how many
greedy ids agree, and uptime.
"""
import argparse
import json
import os
import re
import subprocess
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM


def read_bandwidth(x):
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def bytes_read_per_token(path):
    """Bytes of every tensor in a safetensors file, less the input embedding table when the file
    has a separate head (a token reads one row of the table)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    total = sum(sizes.values())
    embed = next((k for k in sizes if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")), None)
    if embed and any(k.endswith("lm_head.weight") for k in sizes):
        total -= sizes[embed]
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/phigen")
    ap.add_argument("--preset", default="phi-1-small")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        subprocess.run([args.bin, "--quiet", "init", "--preset", args.preset, "--out", ckpt], check=True)
        weights = os.path.join(ckpt, "model.safetensors")
        weight_bytes = os.path.getsize(weights)
        read_bytes = bytes_read_per_token(weights)
        prompt = [50, 1000, 2000, 300, 4000, 77, 9, 123]
        torch.set_num_threads(args.threads)
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

        def hf():
            ids = torch.tensor([prompt])
            with torch.no_grad():
                t = time.perf_counter()
                out = model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                     pad_token_id=0)
                secs = time.perf_counter() - t
            return out[0, len(prompt):].tolist(), secs

        def phigen():
            env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
            p = subprocess.run([args.bin, "sample", "--checkpoint", ckpt, "--greedy", "--max-new-tokens",
                                str(args.new), "--prompt-ids", ",".join(map(str, prompt))],
                               capture_output=True, text=True, check=True, env=env)
            secs = float(re.search(r"generated \d+ tokens in ([0-9.]+)s", p.stderr).group(1))
            return json.loads(p.stdout)["ids"], secs

        probe = torch.rand(256 * 1024 * 1024, dtype=torch.float32)  # 1 GiB
        hf_best, ph_best, shares = float("inf"), float("inf"), []
        for _ in range(args.rounds):
            before = read_bandwidth(probe)
            ph_ids, s = phigen()
            after = read_bandwidth(probe)
            ph_best = min(ph_best, s)
            bw = max(before, after)
            shares.append((len(ph_ids) / s / (bw / read_bytes), bw))
            hf_ids, s = hf()
            hf_best = min(hf_best, s)
        same = next((i for i, (a, b) in enumerate(zip(ph_ids, hf_ids)) if a != b), min(len(ph_ids), len(hf_ids)))
        ph_tps, hf_tps = len(ph_ids) / ph_best, len(hf_ids) / hf_best
        share, bw = max(shares)
        print(f"preset {args.preset}, {weight_bytes / 1e9:.2f} GB fp32 weights ({read_bytes / 1e9:.2f} GB read per "
              f"token), {args.new} new tokens, {args.threads} threads")
        print(f"phigen        {ph_tps:6.2f} tok/s")
        print(f"transformers  {hf_tps:6.2f} tok/s   (torch {torch.__version__})")
        print(f"ratio         {ph_tps / hf_tps:6.2f}x")
        print(f"roofline      phigen at {100 * share:.0f}% of it in its best round (read {bw / 1e9:.1f} GB/s, "
              f"{bw / read_bytes:.2f} tok/s); every round: "
              + ", ".join(f"{100 * s:.0f}% of {b / 1e9:.1f} GB/s" for s, b in shares))
        print(f"greedy ids agree for the first {same} of {len(ph_ids)} tokens")
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
