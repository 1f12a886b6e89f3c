"""Tokenize + pack speed: `phigen tokenize` vs Python tiktoken (`encode_ordinary_batch` + numpy), same
files, same run, identical ids required.

    python benches/tokenize_bench.py [--bin target/release/phigen] [--encoding gpt2[,cl100k_base,o200k_base]]
                                     [--threads 1,2] [--rounds 3]

Corpus: the CPython standard library of this Python (≈ 1,790 files, ≈ 31 MB; see
../shared/benchmarks.md), one document per file, written once as jsonl. Both sides read that file,
encode every document with `encode_ordinary`, append <|endoftext|> and write the tokens to disk (uint16,
or uint32 for cl100k_base and o200k_base). For each encoding and each thread count: interleaved A/B,
best of --rounds; prints MB/s, the ratio per core (same thread count on both sides), whether the ids
are identical, and `uptime`. Exits 1 if any ids differ. Needs `pip install tiktoken numpy`; tiktoken's ranks are
read from the tiktoken-rs crate's assets (no network).
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
import unittest.mock as mock

import numpy as np
import tiktoken
import tiktoken_ext.openai_public as op
from tiktoken.load import load_tiktoken_bpe

RANKS = {"gpt2": "r50k_base", "p50k_base": "p50k_base", "cl100k_base": "cl100k_base", "o200k_base": "o200k_base"}


def encoding(name):
    assets = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/tiktoken-rs-*/assets"))[0]
    ranks = RANKS[name]
    with mock.patch.object(op, "load_tiktoken_bpe", lambda *a, **k: load_tiktoken_bpe(f"{assets}/{ranks}.tiktoken")):
        return tiktoken.Encoding(**getattr(op, ranks)())


def stdlib_texts():
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != os.path.join(root, "site-packages")]
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    texts = []
    for p in sorted(paths):
        try:
            texts.append(open(p, encoding="utf-8").read())
        except (UnicodeDecodeError, OSError):
            pass
    return [t for t in texts if t.strip()]


def bench(args, encoding_name, threads, texts, corpus, tmp):
    enc = encoding(encoding_name)
    eot = enc.eot_token
    dtype = np.uint16 if enc.n_vocab <= 1 << 16 else np.uint32
    size = os.path.getsize(corpus)
    text_bytes = sum(len(t.encode()) for t in texts)

    def python():
        t = time.perf_counter()
        docs = [json.loads(line)["text"] for line in open(corpus)]
        ids = enc.encode_ordinary_batch(docs, num_threads=threads)
        flat = np.concatenate([np.array(d + [eot], dtype=dtype) for d in ids])
        flat.tofile(os.path.join(tmp, "py.bin"))
        return time.perf_counter() - t, flat

    def phigen():
        out = os.path.join(tmp, "tok")
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        t = time.perf_counter()
        subprocess.run([args.bin, "--quiet", "tokenize", "--input", corpus, "--out", out, "--tokenizer",
                        encoding_name, "--val-fraction", "0", "--force"], check=True, env=env)
        secs = time.perf_counter() - t
        meta = json.load(open(os.path.join(out, "meta.json")))
        shards = meta["splits"]["train"]["shards"]
        parts = []
        for s in shards:
            path = os.path.join(out, s)
            width = int(np.fromfile(path, dtype=np.uint32, count=4)[3])  # header: bytes per token
            parts.append(np.fromfile(path, dtype=np.uint16 if width == 2 else np.uint32, offset=32))
        return secs, np.concatenate(parts)

    py_best, ph_best = float("inf"), float("inf")
    for _ in range(args.rounds):
        s, ph_ids = phigen()
        ph_best = min(ph_best, s)
        s, py_ids = python()
        py_best = min(py_best, s)
    same = ph_ids.shape == py_ids.shape and bool((ph_ids.astype(np.uint32) == py_ids.astype(np.uint32)).all())
    mb = text_bytes / 1e6
    print(f"corpus: {len(texts)} stdlib files, {mb:.1f} MB of text ({size / 1e6:.1f} MB jsonl), "
          f"{len(py_ids)} tokens, encoding {encoding_name}, {threads} threads")
    print(f"phigen tokenize      {mb / ph_best:6.2f} MB/s  ({ph_best:.2f} s, process start and hashing included)")
    print(f"tiktoken-py + numpy  {mb / py_best:6.2f} MB/s  ({py_best:.2f} s, tiktoken {tiktoken.__version__})")
    print(f"ratio                {py_best / ph_best:6.2f}x  (same threads, so the same per core)")
    print(f"identical ids: {same}")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    return same


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/phigen")
    ap.add_argument("--encoding", default="gpt2", help="comma-separated: gpt2,p50k_base,cl100k_base,o200k_base")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, each run on both sides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        texts = stdlib_texts()
        corpus = os.path.join(tmp, "stdlib.jsonl")
        with open(corpus, "w") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"id": str(i), "text": t}) + "\n")
        same = True
        for name in args.encoding.split(","):
            for threads in [int(t) for t in args.threads.split(",")]:
                same &= bench(args, name, threads, texts, corpus, tmp)
                print()
        sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
