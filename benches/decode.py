"""CPU decode speed: phigen vs transformers `generate`, same checkpoint, same run.

    python benches/decode.py [--bin target/release/phigen] [--preset phi-1-small] [--new 256]

Needs torch + transformers (a throw-away venv; see ../shared/benchmarks.md). Steps:
1. `phigen init` writes a random-init checkpoint (fp32);
2. transformers loads that directory with `from_pretrained` (no conversion) and runs greedy
   `generate` (batch 1, KV cache) with as many threads as phigen uses;
3. `phigen sample --prompt-ids … --greedy` does the same; interleaved A/B/A/B, best of --rounds;
4. read bandwidth is measured with torch (sum over a 1 GiB tensor), and the roofline is
   weight bytes ÷ bandwidth (each new token reads every weight once).
Prints both speeds, the ratio, the share of the roofline, how many greedy ids agree, and uptime.
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


def read_bandwidth(threads):
    torch.set_num_threads(threads)
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)  # 1 GiB
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


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
        weight_bytes = os.path.getsize(os.path.join(ckpt, "model.safetensors"))
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

        hf_best, ph_best = float("inf"), float("inf")
        for _ in range(args.rounds):
            ph_ids, s = phigen()
            ph_best = min(ph_best, s)
            hf_ids, s = hf()
            hf_best = min(hf_best, s)
        same = next((i for i, (a, b) in enumerate(zip(ph_ids, hf_ids)) if a != b), min(len(ph_ids), len(hf_ids)))
        bw = read_bandwidth(args.threads)
        roofline = bw / weight_bytes
        ph_tps, hf_tps = len(ph_ids) / ph_best, len(hf_ids) / hf_best
        print(f"preset {args.preset}, {weight_bytes / 1e9:.2f} GB fp32 weights, {args.new} new tokens, "
              f"{args.threads} threads")
        print(f"phigen        {ph_tps:6.2f} tok/s")
        print(f"transformers  {hf_tps:6.2f} tok/s   (torch {torch.__version__})")
        print(f"ratio         {ph_tps / hf_tps:6.2f}x")
        print(f"roofline      {roofline:6.2f} tok/s  (read {bw / 1e9:.1f} GB/s); phigen at {100 * ph_tps / roofline:.0f}%")
        print(f"greedy ids agree for the first {same} of {len(ph_ids)} tokens")
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
