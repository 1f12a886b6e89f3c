"""Checkpoints phigen writes load in transformers with `from_pretrained`, no conversion, and give
the same greedy generation.

    python scripts/hf_roundtrip.py [--bin target/debug/phigen]

For each tiny preset (phi, phi-3, llama layouts): `phigen init` writes a random checkpoint;
transformers loads it and generates 16 greedy tokens; `phigen sample --prompt-ids --greedy`
does the same; the ids must be identical. Exits non-zero on any difference.
"""
import argparse
import json
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/phigen")
    args = ap.parse_args()
    prompt = [5, 17, 300, 42, 7, 99]
    failed = False
    for preset in ["tiny-phi", "tiny-phi3", "tiny-llama"]:
        with tempfile.TemporaryDirectory() as ckpt:
            subprocess.run([args.bin, "--quiet", "init", "--preset", preset, "--out", ckpt, "--force"], check=True)
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                                     do_sample=False, pad_token_id=0)
            hf_ids = out[0, len(prompt):].tolist()
            p = subprocess.run([args.bin, "--quiet", "sample", "--checkpoint", ckpt, "--greedy",
                                "--max-new-tokens", "16", "--prompt-ids", ",".join(map(str, prompt))],
                               capture_output=True, text=True, check=True)
            ours = json.loads(p.stdout)["ids"]
            ok = ours == hf_ids
            failed |= not ok
            print(f"{preset:10} {type(model).__name__:18} {'same' if ok else 'DIFFERENT'}  {ours}")
            if not ok:
                print(f"{'':10} transformers {hf_ids}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
