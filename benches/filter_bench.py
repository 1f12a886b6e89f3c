"""The educational-value filter on real code: every `.py` file of a Python installation.

    python benches/filter_bench.py --bin target/release/phigen --forest-bin PATH [--corpus DIR]

`--forest-bin` is the `forest` bench binary (`cargo bench --bench forest --no-run` prints its
path); without it the forest comparison (2.) is left out. Needs `pip install scikit-learn pyarrow
numpy`. The corpus defaults to this interpreter's `lib/` tree (with site-packages: tens of thousands of files when torch is installed).

Labels are a rule of thumb (a docstring and a function: positive) so no teacher is needed; what is
measured is speed, and the forest's ROC-AUC on the same held-out rows for both libraries.

1. Features: `phigen classify embed` (hashed n-grams + statistics) over the corpus, files/s.
2. Forest: phigen's forest (hist engine, 1 thread and all threads; linfa-trees engine) against
   scikit-learn `RandomForestClassifier` (100 trees, max_features="sqrt", class_weight="balanced",
   n_jobs=1 and -1) on the same matrix and split: fit and predict seconds and ratios.
3. Filter end to end: `phigen classify train` then `phigen filter --model` over the corpus, files/s,
   `--rounds` times (the median and best are printed), as it runs by default and with
   `--count-tokens` (the GPT-2 token count of the kept files, on request since it costs more than
   the rest); the kept set must be the same in every run.
Prints `uptime` (the load) with the numbers.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def forest(args, x, y, n_train, tmp, n_ids):
    """phigen's forest against scikit-learn's on the same matrix and split."""
    xb, yb = os.path.join(tmp, "x.f32"), os.path.join(tmp, "y.u8")
    x.astype("<f4").tofile(xb)
    y.tofile(yb)
    out = subprocess.run([args.forest_bin, xb, yb, str(x.shape[1]), str(n_train), str(args.trees)],
                         check=True, capture_output=True, text=True).stdout
    ours = json.loads(out.strip().splitlines()[-1])
    sk = {}
    for name, jobs in [("sklearn_1_thread", 1), ("sklearn_all_threads", -1)]:
        clf = RandomForestClassifier(n_estimators=args.trees, max_features="sqrt",
                                     class_weight="balanced", n_jobs=jobs, random_state=0)
        t = time.time()
        clf.fit(x[:n_train], y[:n_train])
        fit = time.time() - t
        t = time.time()
        p = clf.predict_proba(x[n_train:])[:, 1]
        predict = time.time() - t
        sk[name] = {"fit_s": fit, "predict_s": predict, "roc_auc": roc_auc_score(y[n_train:], p)}
    print(f"forest: {n_train} train rows, {n_ids - n_train} scored, {args.trees} trees")
    for name, r in {**ours, **sk}.items():
        print(f"  {name:20s} fit {r['fit_s']:7.3f}s  predict {r['predict_s']:7.4f}s  ROC-AUC {r['roc_auc']:.4f}")
    for mine, theirs in [("hist_1_thread", "sklearn_1_thread"), ("hist_all_threads", "sklearn_all_threads"),
                         ("linfa_all_threads", "sklearn_all_threads")]:
        a, b = ours[mine], sk[theirs]
        print(f"  ratio {mine} vs {theirs}: fit {b['fit_s'] / a['fit_s']:.2f}x faster, "
              f"predict {b['predict_s'] / a['predict_s']:.2f}x faster")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/phigen")
    ap.add_argument("--forest-bin", help="the forest bench binary; without it the forest comparison is skipped")
    ap.add_argument("--corpus", default=os.path.dirname(os.path.dirname(os.__file__)))
    ap.add_argument("--trees", type=int, default=100)
    ap.add_argument("--minilm", help="all-MiniLM-L6-v2 directory: also time `classify embed --embedder bert`")
    ap.add_argument("--minilm-files", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3, help="filter runs of each kind (default and --count-tokens)")
    args = ap.parse_args()
    print("load:", uptime())
    with tempfile.TemporaryDirectory() as tmp:
        # Only the .py files (data files in the tree are not code tables).
        corpus = os.path.join(tmp, "stack")
        for dirpath, dirnames, filenames in os.walk(os.path.abspath(args.corpus)):
            dirnames.sort()
            for name in filenames:
                if name.endswith(".py"):
                    src = os.path.join(dirpath, name)
                    dst = os.path.join(corpus, os.path.relpath(src, args.corpus))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    with open(src, "rb") as a, open(dst, "wb") as b:
                        b.write(a.read())
        feats = os.path.join(tmp, "features.parquet")
        t = time.time()
        subprocess.run([args.bin, "--quiet", "classify", "embed", "--input", corpus, "--out", feats], check=True)
        embed_s = time.time() - t
        table = pq.read_table(feats)
        ids = table.column("id").to_pylist()
        x = np.stack([table.column(f"f{d}").to_numpy() for d in range(table.num_columns - 1)], axis=1).astype(np.float32)
        mb = 0
        y = np.zeros(len(ids), dtype=np.uint8)
        for i, fid in enumerate(ids):
            path = os.path.join(os.path.dirname(corpus), fid)
            text = open(path, encoding="utf-8").read()
            mb += len(text.encode()) / 1e6
            y[i] = 1 if ('"""' in text and "def " in text) else 0
        print(f"corpus: {len(ids)} readable files, {mb:.1f} MB, {y.mean():.1%} positive by the rule")
        print(f"features: phigen classify embed {len(ids) / embed_s:.0f} files/s ({mb / embed_s:.1f} MB/s) end to end, {x.shape[1]} features")

        rng = np.random.default_rng(0)
        order = rng.permutation(len(ids))
        x, y = x[order], y[order]
        n_train = int(0.8 * len(ids))
        if args.forest_bin:
            forest(args, x, y, n_train, tmp, len(ids))

        if args.minilm:
            sub = os.path.join(tmp, "sub", "stack")
            os.makedirs(sub)
            for fid in ids[:args.minilm_files]:
                src = os.path.join(os.path.dirname(corpus), fid)
                with open(src, "rb") as a, open(os.path.join(sub, fid.replace("/", "_")), "wb") as b:
                    b.write(a.read())
            t = time.time()
            subprocess.run([args.bin, "--quiet", "classify", "embed", "--input", sub, "--out",
                            os.path.join(tmp, "bert.parquet"), "--embedder", "bert", "--bert-model", args.minilm,
                            "--embed-cache", os.path.join(tmp, "cache")], check=True)
            secs = time.time() - t
            print(f"features: MiniLM (256 tokens per file) {args.minilm_files / secs:.1f} files/s over {args.minilm_files} files, model load included")

        labels = os.path.join(tmp, "labels.csv")
        with open(labels, "w") as f:
            f.write("path,label\n")
            for fid, lab in zip([ids[i] for i in order], y):
                f.write(f"{fid},{'high' if lab else 'low'}\n")
        model = os.path.join(tmp, "edu.rf")
        subprocess.run([args.bin, "--quiet", "classify", "train", "--labels", labels, "--input", corpus,
                        "--out", model], check=True)
        kept_sets = set()
        for flags in ([], ["--count-tokens"]):
            secs = []
            for r in range(args.rounds):
                out = os.path.join(tmp, f"filtered-{len(flags)}-{r}")
                t = time.time()
                subprocess.run([args.bin, "--quiet", "filter", "--input", corpus, "--model", model,
                                "--out", out] + flags, check=True)
                filter_s = time.time() - t
                stats = json.load(open(os.path.join(out, "stats.json")))
                secs.append(filter_s)
                kept = set()
                for dirpath, _, names in os.walk(os.path.join(out, "kept")):
                    for name in names:
                        kept.update(pq.read_table(os.path.join(dirpath, name), columns=["id"]).column("id").to_pylist())
                kept_sets.add(frozenset(kept))
                shutil.rmtree(out)
            median, best = sorted(secs)[len(secs) // 2], min(secs)
            tokens = f", {stats['tokens_kept']} GPT-2 tokens kept" if flags else ""
            print(f"filter end to end{' --count-tokens' if flags else ''} (read, embed, score, write scored + kept "
                  f"Parquet{', count GPT-2 tokens of kept' if flags else ''}): median {stats['files'] / median:.0f} "
                  f"files/s ({mb / median:.1f} MB/s), best {stats['files'] / best:.0f}, "
                  f"rounds {[round(stats['files'] / t) for t in secs]}; kept {stats['kept']} of {stats['scored']}{tokens}")
        assert len(kept_sets) == 1, "the kept set changed between runs"
    print("load:", uptime())


if __name__ == "__main__":
    sys.exit(main())
