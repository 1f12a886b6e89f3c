"""Would a repair turn save the textbook sections whose code fails? For each kept section of a
`phigen textbooks` output directory whose program fails (its Python blocks as phigen reads them, run
in order in bubblewrap, as benches/local_keep_rate.py runs them), ask the model, through llama.cpp,
to correct the program given its error, and run the answer the same way. Prints each error, what
the corrected program did, and how many were fixed. Generated code runs only inside bubblewrap.

Run on 2026-12-06 (README, the local teacher) over the 31 failing programs of a Qwen2.5-Coder-0.5B
v3 run (its kept sections and the syntax_error drops the new reading of bare fences keeps), with
the same GGUF through llama_cpp_python 0.3.36: 4 fixed (13%), about 20 s each.

    /tmp/v/bin/pip install llama-cpp-python pyarrow
    /tmp/v/bin/python benches/repair_turn.py --gguf MODEL.gguf OUT/textbooks
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import time

import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import local_keep_rate as k  # noqa: E402

PROMPT = """This Python program fails when it runs:

```python
{code}
```

It stops with this error:

```
{error}
```

Write the corrected program, complete, in one ```python block. It must run as it is, use only the Python standard library, and not read input, files or the network."""


def run(code):
    """(exit status, last line of stderr) of `code` in bubblewrap, as local_keep_rate.runs."""
    cmd = ["bwrap", "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--dev", "/dev", "--proc", "/proc",
           "--unshare-all", "--die-with-parent", "--chdir", "/tmp", k.PYTHON, "-I", "-c", code]
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 1, "timed out"
    return r.returncode, (r.stderr.decode().strip().splitlines() or ["?"])[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", help="a phigen textbooks output directory (part-*.parquet)")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from llama_cpp import Llama

    texts = [t for f in sorted(glob.glob(os.path.join(args.dir, "part-*.parquet")))
             for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    failing = []
    for t in texts:
        code = "\n".join(k.python_blocks(t))
        status, error = run(code)
        if status:
            failing.append((code, error))
    print(f"{len(failing)} of {len(texts)} sections fail", flush=True)
    llm = Llama(args.gguf, n_ctx=4096, n_threads=args.threads, verbose=False, seed=1)
    fixed, start = 0, time.time()
    for code, error in failing:
        prompt = PROMPT.format(code=code.strip(), error=error)
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=800,
                                         temperature=0.7, top_p=0.95, min_p=0.05, seed=1)
        blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", out["choices"][0]["message"]["content"], re.S)
        status, after = run(blocks[0]) if blocks else (1, "no code block")
        fixed += status == 0
        print(f"{error[:60]!r} -> {'runs' if status == 0 else after[:60]!r}", flush=True)
    n = max(len(failing), 1)
    print(f"fixed {fixed} of {len(failing)} ({fixed / n:.0%}), {(time.time() - start) / n:.1f} s each")


if __name__ == "__main__":
    main()
