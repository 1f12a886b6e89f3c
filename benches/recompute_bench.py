"""CPU training with and without activation recompute (`checkpoint = "blocks"`): step speed and
peak memory of `phigen train`, same config, same data, same seed.

    python3 benches/recompute_bench.py [--bin target/debug/phigen] [--steps 8] [--layers 8]
        [--hidden 256] [--seq 512] [--batch 4] [--rounds 2]

A phi-layout config (heads of 64, MLP 4·d, GPT-2 vocabulary padded to 50,304) is written as
config.json; token shards of random ids in phigen's format; one recipe per mode, differing only in
`checkpoint`. Each run's speed is the median tokens/s of its steps after two warm-up steps
(metrics.jsonl), its memory the peak resident set of the process (`/usr/bin/time -f %M`). Modes
are interleaved, best of --rounds. Standard library only; prints `uptime`.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
from array import array


def write_data(tmp, n):
    """Token shards of `n` random ids in phigen's format (32-byte header, then uint16)."""
    tok = os.path.join(tmp, "tok")
    os.makedirs(tok)
    rng = random.Random(0)
    ids = array("H", (rng.randrange(50257) for _ in range(n)))
    with open(os.path.join(tok, "train-00000.bin"), "wb") as f:
        f.write(b"PHIGTOKS" + (1).to_bytes(4, "little") + (2).to_bytes(4, "little")
                + n.to_bytes(8, "little") + (1).to_bytes(8, "little"))
        ids.tofile(f)
    meta = {"format_version": 1, "tokenizer": "gpt2", "vocab_size": 50257, "end_of_text": 50256,
            "token_width": "u16", "val_fraction": 0.0, "sources": [],
            "splits": {"train": {"documents": 1, "tokens": n, "shards": ["train-00000.bin"]},
                       "val": {"documents": 0, "tokens": 0, "shards": []}}}
    json.dump(meta, open(os.path.join(tok, "meta.json"), "w"))
    return tok


def write_config(tmp, args):
    cfg_dir = os.path.join(tmp, "config")
    os.makedirs(cfg_dir)
    cfg = {"architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_act": "gelu_new",
           "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
           "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
           "num_key_value_heads": args.hidden // 64, "max_position_embeddings": max(2048, args.seq),
           "layer_norm_eps": 1e-5, "initializer_range": 0.02, "qk_layernorm": False,
           "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_type": "default"},
           "attention_dropout": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
           "tie_word_embeddings": False, "vocab_size": 50304, "bos_token_id": 50256,
           "eos_token_id": 50256}
    json.dump(cfg, open(os.path.join(cfg_dir, "config.json"), "w"), indent=1)
    return cfg_dir


def write_recipe(tmp, cfg_dir, tok, args, checkpoint):
    recipe = os.path.join(tmp, f"bench-{checkpoint}.toml")
    steps = args.steps
    open(recipe, "w").write(f"""
name = "bench"
[model]
config = "{cfg_dir}"
[[stage]]
name = "s"
data = [{{ path = "{tok}" }}]
seq_len = {args.seq}
micro_batch = {args.batch}
steps = {steps}
lr = 1e-3
weight_decay = 0.1
eval_every = {steps * 10}
checkpoint_every = {steps * 10}
checkpoint = "{checkpoint}"
""")
    return recipe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/phigen")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_data(tmp, 1_000_000)
        cfg_dir = write_config(tmp, args)

        def run(checkpoint):
            recipe = write_recipe(tmp, cfg_dir, tok, args, checkpoint)
            out = os.path.join(tmp, "run")
            subprocess.run(["rm", "-rf", out])
            p = subprocess.run(["/usr/bin/time", "-f", "%M", args.bin, "--quiet", "train", "--recipe", recipe,
                                "--out", out], check=True, capture_output=True, text=True)
            peak_kb = int(p.stderr.strip().splitlines()[-1])
            rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if "train_loss" in l]
            return statistics.median(r["tokens_per_sec"] for r in rows[2:]), peak_kb / 1e6, rows[-1]["train_loss"]

        best = {"none": None, "blocks": None}
        for _ in range(args.rounds):
            for mode in best:
                r = run(mode)
                best[mode] = r if best[mode] is None else (max(best[mode][0], r[0]), min(best[mode][1], r[1]), r[2])
        print(f"phi config: {args.layers} layers, d {args.hidden}, batch {args.batch} × seq {args.seq}, fp32, "
              f"{os.cpu_count()} CPUs, {args.steps} steps, best of {args.rounds}")
        for mode, (speed, peak, loss) in best.items():
            print(f"checkpoint = {mode:<8} {speed:8.0f} tok/s   peak RSS {peak:6.2f} GB   last loss {loss:.4f}")
        (s0, m0, _), (s1, m1, _) = best["none"], best["blocks"]
        print(f"recompute: {s1 / s0:.2f}x the speed, {m1 / m0:.2f}x the peak memory")
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
