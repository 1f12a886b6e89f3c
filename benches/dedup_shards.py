"""What running dedup as array tasks costs: `phigen dedup` as one process vs the four array stages
as 4 tasks each (signatures ×4, buckets ×4, clusters ×1, filter ×4), run one after another.

    python benches/dedup_shards.py --bin $CARGO_TARGET_DIR/debug/phigen [--mb 100] [--tasks 4] [--rounds 5] [--threads T]

Corpus (synthetic, written once under a temp dir, seed fixed): `--mb` MB of jsonl in 16 files,
documents of 150–300 words drawn with a Zipf-like skew from a 20,000-word vocabulary; 10% of the
documents get a near copy (3 words changed, 5-gram Jaccard ≈ 0.9) and 2% an exact copy, each
written into another file than its original, so pairs cross task boundaries.

Measured: CPU time (user + sys) of the child processes, from getrusage(RUSAGE_CHILDREN) deltas, and
wall time; `--threads` sets RAYON_NUM_THREADS for both sides (default: every core). The target is array CPU ≤ 1.3 × one run's. Rounds alternate which side goes first
(after an untimed warm-up of both); the medians, the minima and the per-round ratios are printed,
with whether the kept files and removed.parquet of both sides are byte-identical, the array's CPU
per stage, and `uptime`. On a shared machine CPU time drifts by ±30% between minutes, hence the
many rounds and the ratio of the minima next to the medians.
"""
import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

FILES = 16


def make_corpus(root, mb, seed=7):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20000)]
    weights = [1.0 / (i + 10) for i in range(len(vocab))]
    files = [[] for _ in range(FILES)]
    size, n = 0, 0
    while size < mb * 1e6:
        words = rng.choices(vocab, weights, k=rng.randint(150, 300))
        text = " ".join(words)
        f = n % FILES
        files[f].append({"id": f"d{n}", "text": text})
        size += len(text) + 30
        r = rng.random()
        if r < 0.10:
            near = list(words)
            for _ in range(3):
                near[rng.randrange(len(near))] = f"x{rng.randrange(10**6)}"
            files[(f + 1 + rng.randrange(FILES - 1)) % FILES].append({"id": f"d{n}-near", "text": " ".join(near)})
            size += len(text) + 30
        elif r < 0.12:
            files[(f + 1 + rng.randrange(FILES - 1)) % FILES].append({"id": f"d{n}-copy", "text": text})
            size += len(text) + 30
        n += 1
    os.makedirs(root, exist_ok=True)
    for i, docs in enumerate(files):
        with open(os.path.join(root, f"part-{i:02}.jsonl"), "w") as out:
            for d in docs:
                out.write(json.dumps(d) + "\n")
    return n, size


def cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def phigen(binary, corpus, out, *args, env=None):
    cmd = [binary, "--quiet", "dedup", "--input", corpus, "--out", out, *args]
    subprocess.run(cmd, check=True, env=env or os.environ)


def whole(binary, corpus, out):
    phigen(binary, corpus, out)


STAGE_CPU = {}


def array(binary, corpus, out, tasks):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION"))}
    for stage, n in [("signatures", tasks), ("buckets", tasks), ("clusters", 1), ("filter", tasks)]:
        started = cpu()
        for k in range(n):
            env = dict(base, SLURM_ARRAY_TASK_ID=str(k), SLURM_ARRAY_TASK_COUNT=str(n))
            phigen(binary, corpus, out, "--stage", stage, env=env)
        STAGE_CPU.setdefault(stage, []).append(cpu() - started)


def outputs(out):
    """sha256 of every kept file and removed.parquet (not the stage dirs, control files, stats)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(out):
        rel_dir = os.path.relpath(dirpath, out)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in ("signatures", "buckets", "clusters", "filter")]
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if name.startswith(".phigen") or rel == "stats.json":
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                found[rel] = hashlib.sha256(f.read()).hexdigest()
    return found


def timed(fn, *args):
    c, t = cpu(), time.perf_counter()
    fn(*args)
    return cpu() - c, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, help="RAYON_NUM_THREADS for every process (default: all cores)")
    a = ap.parse_args()
    if a.threads:
        os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    tmp = tempfile.mkdtemp(prefix="dedup-shards-")
    try:
        corpus = os.path.join(tmp, "corpus")
        started = time.perf_counter()
        docs, size = make_corpus(corpus, a.mb)
        print(f"corpus: {docs} originals, {size / 1e6:.1f} MB in {FILES} files ({time.perf_counter() - started:.0f}s to write)")
        for name in os.listdir(corpus):  # warm the page cache for both sides alike
            with open(os.path.join(corpus, name), "rb") as f:
                while f.read(1 << 24):
                    pass
        for fn, extra in [(whole, ()), (array, (a.tasks,))]:  # warm-up, untimed
            out = os.path.join(tmp, "warm-up")
            shutil.rmtree(out, ignore_errors=True)
            fn(a.bin, corpus, out, *extra)
        STAGE_CPU.clear()
        one, many, same = [], [], True
        for r in range(a.rounds):
            sides = [("one", whole, ()), ("array", array, (a.tasks,))]
            if r % 2:
                sides.reverse()
            got = {}
            for name, fn, extra in sides:
                out = os.path.join(tmp, f"out-{name}")
                shutil.rmtree(out, ignore_errors=True)
                got[name] = timed(fn, a.bin, corpus, out, *extra)
                print(f"round {r}: {name:5} cpu {got[name][0]:7.1f}s  wall {got[name][1]:7.1f}s", flush=True)
            one.append(got["one"])
            many.append(got["array"])
            same = same and outputs(os.path.join(tmp, "out-one")) == outputs(os.path.join(tmp, "out-array"))
        with open(os.path.join(tmp, "out-one", "stats.json")) as f:
            stats = json.load(f)
        c1 = statistics.median(c for c, _ in one)
        cn = statistics.median(c for c, _ in many)
        w1 = statistics.median(w for _, w in one)
        wn = statistics.median(w for _, w in many)
        print(f"documents {stats['documents']}, removed {stats['removed_exact']} exact + {stats['removed_near']} near")
        print(f"1 task:        cpu {c1:.1f}s, wall {w1:.1f}s")
        print(f"{a.tasks} tasks/stage: cpu {cn:.1f}s, wall {wn:.1f}s (run one after another)")
        stages = ", ".join(f"{st} {statistics.median(v):.2f}s" for st, v in STAGE_CPU.items())
        print(f"array cpu per stage (medians): {stages}")
        print(f"threads per process: {os.environ.get('RAYON_NUM_THREADS', 'all cores')}")
        ratios = [m[0] / o[0] for o, m in zip(one, many)]
        best = min(c for c, _ in many) / min(c for c, _ in one)
        print(f"cpu ratio of the medians {cn / c1:.2f}x, of the minima {best:.2f}x, median per-round ratio "
              f"{statistics.median(ratios):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ratios)}; target <= 1.3x); "
              f"outputs byte-identical: {same}")
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        if not same:
            sys.exit(1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
