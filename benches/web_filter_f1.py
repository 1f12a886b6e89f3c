"""F1 of the web-text filter (`--preset web`) on a real split that it never trained on.

    python benches/web_filter_f1.py --bin target/debug/phigen [--embedder bert --bert-model DIR]

Needs `pip install pyarrow` (to read the scored Parquet). Everything else is on this machine: the
Python installation that runs the script and Debian's /usr/share/doc.

The labels (what is educational) come from where a text was written, not from phigen:
- educational: text written to explain — the Python language reference as pydoc ships it
  (`pydoc_data.topics`), module docstrings of the standard library of at least 400 characters,
  and README files (.md, .rst, or plain) under /usr/share/doc of at least 1,000 characters;
- not educational: text that teaches nothing about a subject — Debian changelogs
  (`changelog.Debian.gz`, `changelog.gz`, `NEWS.Debian.gz`) and copyright / license files.
On FineWeb-Edu's additive scale an explanation of a language feature or of how to use a program
earns points 1-3 at least (basic information, coherent, usable in a class), and release logs and
license boilerplate earn none. It is a proxy with clear-cut genres, so the F1 is an upper bound on
what a teacher's noisier ratings of real web text would give.

The split is by source: a group (one Debian package, one top-level stdlib module, one pydoc
topic) is entirely in the test split or entirely in the training split (30% of groups by a hash
of the group's name), so no package's README is learned and then scored. Identical texts (e.g. the
same GPL copyright file in many packages) are kept once. Each text is cut to its first 6,000
characters. Training labels go to `phigen classify train --preset web` (the training texts only,
`--holdout 0`); the test texts are scored by `phigen filter --preset web --model` and compared with
their labels: precision, recall and F1 of "educational" at the classifier's threshold (0.5).
"""
import argparse
import ast
import gzip
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

MAX_CHARS = 6000


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def read_text(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read(MAX_CHARS * 2)
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def python_docs():
    """(group, source, text) of educational Python text: pydoc topics and module docstrings."""
    import pydoc_data.topics

    for name, text in sorted(pydoc_data.topics.topics.items()):
        yield f"pydoc:{name}", "pydoc_topic", text
    stdlib = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("test", "tests", "site-packages", "idlelib", "__pycache__")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, stdlib)
            try:
                with open(path, encoding="utf-8") as f:
                    doc = ast.get_docstring(ast.parse(f.read()))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            if doc and len(doc) >= 400:
                yield f"stdlib:{rel.split(os.sep)[0].removesuffix('.py')}", "module_docstring", doc


def debian_docs():
    """(group, source, text) under /usr/share/doc: READMEs (educational), changelogs and
    copyright files (not)."""
    root = "/usr/share/doc"
    for package in sorted(os.listdir(root)):
        pdir = os.path.join(root, package)
        if not os.path.isdir(pdir) or os.path.islink(pdir):
            continue
        for dirpath, dirnames, filenames in os.walk(pdir):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    continue
                lower = name.lower()
                if lower in ("changelog.debian.gz", "changelog.gz", "news.debian.gz"):
                    source = "changelog"
                elif lower == "copyright" or lower.startswith(("license", "copying")):
                    source = "copyright"
                elif lower.startswith("readme") and not lower.startswith("readme.debian"):
                    source = "readme"
                else:
                    continue
                text = read_text(path)
                if text is None:
                    continue
                if source == "readme" and len(text) < 1000:
                    continue
                yield f"deb:{package}", source, text


EDUCATIONAL = {"pydoc_topic", "module_docstring", "readme"}


def in_test(group):
    return int(hashlib.sha256(group.encode()).hexdigest(), 16) % 10 < 3


def run(cmd):
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return time.time() - t, p.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/phigen")
    ap.add_argument("--embedder", default="hashed", help="hashed, bert or lm:DIR")
    ap.add_argument("--bert-model", help="all-MiniLM-L6-v2 directory for --embedder bert")
    ap.add_argument("--per-source", type=int, default=600, help="at most this many texts of each source")
    ap.add_argument("--trees", type=int, default=200)
    ap.add_argument("--keep", help="keep the work directory here")
    args = ap.parse_args()
    import pyarrow.parquet as pq

    print("load:", uptime())
    seen, rows, per_source = set(), [], {}
    for group, source, text in list(python_docs()) + list(debian_docs()):
        text = text[:MAX_CHARS]
        key = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if not text.strip() or key in seen or per_source.get(source, 0) >= args.per_source:
            continue
        seen.add(key)
        per_source[source] = per_source.get(source, 0) + 1
        rows.append((group, source, text))
    work = args.keep or tempfile.mkdtemp(prefix="web-f1-")
    os.makedirs(os.path.join(work, "train"), exist_ok=True)
    os.makedirs(os.path.join(work, "test"), exist_ok=True)
    truth, counts = {}, {}
    with open(os.path.join(work, "train/web.jsonl"), "w") as tr, open(
        os.path.join(work, "test/web.jsonl"), "w"
    ) as te, open(os.path.join(work, "labels.csv"), "w") as labels:
        labels.write("id,label\n")
        for i, (group, source, text) in enumerate(rows):
            split = "test" if in_test(group) else "train"
            good = source in EDUCATIONAL
            doc_id = f"{split}-{i:05d}"
            (te if split == "test" else tr).write(json.dumps({"id": doc_id, "text": text, "source": source}) + "\n")
            counts[(split, source)] = counts.get((split, source), 0) + 1
            if split == "train":
                labels.write(f"{doc_id},{'high' if good else 'low'}\n")
            else:
                truth[doc_id] = (good, source)
    for split in ("train", "test"):
        parts = ", ".join(f"{s} {counts.get((split, s), 0)}" for s in sorted(per_source))
        print(f"{split}: {sum(c for (sp, _), c in counts.items() if sp == split)} texts ({parts})")
    model = os.path.join(work, "web.rf")
    embed = ["--embedder", args.embedder] + (["--bert-model", args.bert_model] if args.bert_model else [])
    embed += ["--embed-cache", os.path.join(work, "cache")]
    fit_s, _ = run([args.bin, "--quiet", "classify", "train", "--preset", "web", "--labels",
                    os.path.join(work, "labels.csv"), "--input", os.path.join(work, "train"),
                    "--out", model, "--holdout", "0", "--trees", str(args.trees)] + embed)
    out = os.path.join(work, "filtered")
    score_s, _ = run([args.bin, "--quiet", "filter", "--preset", "web", "--input",
                      os.path.join(work, "test"), "--model", model, "--out", out])
    table = pq.read_table(os.path.join(out, "scored/test/web.parquet"))
    ids, kept = table.column("id").to_pylist(), table.column("kept").to_pylist()
    tp = fp = fn = tn = 0
    wrong = {}
    for doc_id, k in zip(ids, kept):
        good, source = truth[doc_id]
        tp += k and good
        fp += k and not good
        fn += (not k) and good
        tn += (not k) and not good
        if k != good:
            wrong[source] = wrong.get(source, 0) + 1
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    print(f"embedder {args.embedder}: train {fit_s:.1f} s, score {score_s:.1f} s")
    print(f"held-out {len(ids)} texts: TP {tp} FP {fp} FN {fn} TN {tn}; errors by source {wrong}")
    print(f"precision {precision:.3f}  recall {recall:.3f}  F1 {f1:.3f}")
    print("load:", uptime())


if __name__ == "__main__":
    main()
