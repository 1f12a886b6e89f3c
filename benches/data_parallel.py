"""Data parallel training on the CPU backend: world size 1 vs 2 processes (ranks) of
`phigen train`, each rank on one thread (RAYON_NUM_THREADS=1), same recipe, same global batch.

    python3 benches/data_parallel.py [--bin target/debug/phigen] [--steps 8] [--layers 4]
        [--hidden 256] [--seq 256] [--batch 4] [--rounds 2]

The global batch is 2 micro-batches of --batch sequences: one process computes both, two ranks
one each, then sum their gradients over the local IPC backend. Speed is the median tokens/s of
the steps after two warm-up steps (rank 0's metrics.jsonl); the collective's share is the median
`comm_secs` over the median step time. Scaling efficiency = tokens/s of 2 ranks / (2 × tokens/s
of 1). On a 2-core machine two ranks use both cores. Standard library only; prints `uptime`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recompute_bench import write_config, write_data  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/phigen")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_data(tmp, 1_000_000)
        cfg_dir = write_config(tmp, args)
        recipe = os.path.join(tmp, "bench.toml")
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
grad_accum = 2
steps = {steps}
lr = 1e-3
weight_decay = 0.1
eval_every = {steps * 10}
checkpoint_every = {steps * 10}
""")

        def run(ranks):
            out = os.path.join(tmp, f"run-{ranks}")
            subprocess.run(["rm", "-rf", out])
            procs = []
            for rank in range(ranks):
                env = dict(os.environ, RAYON_NUM_THREADS="1")
                if ranks > 1:
                    env.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank))
                procs.append(subprocess.Popen([args.bin, "--quiet", "train", "--recipe", recipe, "--out", out],
                                              env=env))
            for p in procs:
                assert p.wait() == 0, "a rank failed"
            rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if "train_loss" in l]
            rows = rows[2:]
            tps = statistics.median(r["tokens_per_sec"] for r in rows)
            step = statistics.median(args.batch * 2 * args.seq / r["tokens_per_sec"] for r in rows)
            comm = statistics.median(r.get("comm_secs", 0.0) for r in rows)
            return tps, comm / step, [r["train_loss"] for r in rows]

        best = {1: None, 2: None}
        for _ in range(args.rounds):
            for ranks in best:
                r = run(ranks)
                best[ranks] = r if best[ranks] is None or r[0] > best[ranks][0] else best[ranks]
        print(f"phi config: {args.layers} layers, d {args.hidden}, global batch 2 × {args.batch} × seq {args.seq}, "
              f"fp32, {os.cpu_count()} CPUs, {steps} steps, 1 thread per rank, best of {args.rounds}")
        for ranks, (tps, comm, _) in best.items():
            print(f"world size {ranks}: {tps:8.0f} tok/s   collective {100 * comm:5.1f}% of a step")
        (t1, _, l1), (t2, _, l2) = best[1], best[2]
        drift = max(abs(a - b) / abs(a) for a, b in zip(l1, l2))
        print(f"scaling efficiency {t2 / (2 * t1):.2f} (2 ranks: {t2 / t1:.2f}x the tokens/s of 1); "
              f"largest relative loss difference {drift:.1e}")
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
