#!/usr/bin/env python3
"""Benchmark: phigen's generation engine vs Python aiohttp against the same zero-latency mock.

Both clients post chat-completion requests to one `phigen mock-server` process on loopback.
phigen runs the full engine (`phigen stories`: prompt sampling, ids, retries, checks, journal and
Parquet shard writing); aiohttp only posts the same number of requests with TinyStories-sized
prompts and parses the JSON answers. Runs are interleaved A/B/A/B, best of --repeats, with `uptime`
printed next to the numbers. CPU µs per request counts the client process only (the mock's CPU is
the same for both).

Setup (throw-away venv, never committed):
    python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install aiohttp
    cargo build --release
    /tmp/bench-venv/bin/python benches/teacher_engine.py --n 20000 --concurrency 64 256
"""
import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_phigen(binary, url, n, concurrency):
    out = tempfile.mkdtemp(prefix="phigen-bench-")
    try:
        cpu0, t0 = child_cpu(), time.perf_counter()
        subprocess.run(
            [binary, "--quiet", "stories", "--base-url", url, "--model", "mock", "--n", str(n),
             "--concurrency", str(concurrency), "--out", out, "--max-attempts", "10"],
            check=True, env={**os.environ, "OPENAI_API_KEY": ""})
        wall, cpu = time.perf_counter() - t0, child_cpu() - cpu0
        stats = json.load(open(os.path.join(out, "stats.json")))
        assert stats["records"] == n, stats
        return wall, cpu, stats["run"]["requests"]["sent"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


AIOHTTP_CLIENT = r"""
import asyncio, json, sys, aiohttp
url, n, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
PROMPT = ('Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year old child '
          'would likely understand. The story should use the verb "jump", the noun "tree" and the adjective '
          '"happy". The story should have the following features: the story should contain at least one '
          'dialogue. Remember to only use simple words! #{}')
async def main():
    q = asyncio.Queue()
    for i in range(n): q.put_nowait(i)
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        async def worker():
            nonlocal done
            while not q.empty():
                i = q.get_nowait()
                body = {"messages": [{"role": "user", "content": PROMPT.format(i)}], "model": "mock",
                        "temperature": 1.0, "top_p": 1.0, "max_tokens": 1024}
                async with s.post(url + "/chat/completions", json=body) as r:
                    data = await r.json()
                    assert data["choices"][0]["message"]["content"]
                    done += 1
        await asyncio.gather(*(worker() for _ in range(conc)))
    assert done == n
asyncio.run(main())
"""


def run_aiohttp(url, n, concurrency):
    cpu0, t0 = child_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-c", AIOHTTP_CLIENT, url, str(n), str(concurrency)], check=True)
    return time.perf_counter() - t0, child_cpu() - cpu0, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "phigen"))
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--port", type=int, default=18089)
    args = ap.parse_args()
    server = subprocess.Popen([args.binary, "mock-server", "--addr", f"127.0.0.1:{args.port}"], stdout=subprocess.PIPE)
    url = server.stdout.readline().decode().split()[-1]
    try:
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        for c in args.concurrency:
            best = {"phigen": None, "aiohttp": None}
            for _ in range(args.repeats):
                for name, fn in (("phigen", lambda: run_phigen(args.binary, url, args.n, c)),
                                 ("aiohttp", lambda: run_aiohttp(url, args.n, c))):
                    wall, cpu, reqs = fn()
                    rate = reqs / wall
                    if best[name] is None or rate > best[name][0]:
                        best[name] = (rate, cpu / reqs * 1e6)
            p, a = best["phigen"], best["aiohttp"]
            print(f"concurrency {c}: phigen {p[0]:.0f} req/s, {p[1]:.0f} CPU µs/req | "
                  f"aiohttp {a[0]:.0f} req/s, {a[1]:.0f} CPU µs/req | ratio {p[0] / a[0]:.2f}x req/s")
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
