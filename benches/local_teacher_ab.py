"""Two or more phigen binaries (and llama.cpp) on the same GGUF in one run, interleaved: the A/B
that says what a change to the local teacher bought, on a host whose speed drifts.

    /tmp/peer/bin/python benches/local_teacher_ab.py OLD_BIN,NEW_BIN[,llama] [CONCURRENCIES] [ROUNDS]
    e.g. benches/local_teacher_ab.py /tmp/phigen-old,target/debug/phigen,llama 1,32 2

Each round runs every binary at every concurrency (256 greedy tokens per request, 2 threads, the
classes of `local_teacher.py`); `llama` (llama_cpp_python) runs the single stream only. Prints each
run, the best of the rounds, each binary's peak RSS and the load average.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import local_teacher as b  # noqa: E402


def main():
    gguf = b.gguf_path(os.environ.get("PHIGEN_SMOLLM2"))
    bins = sys.argv[1].split(",")
    concs = [int(c) for c in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 32]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    llama = None
    if "llama" in bins:
        llama = b.LlamaCpp(gguf, 2, 2048)
        llama.run(b.prompts(1), 16)
    procs = {x: b.Phigen(x, gguf, max(concs), 2) for x in bins if x != "llama"}
    for p in procs.values():
        p.run(b.prompts(1), 16)  # warm-up, not timed
    best = {}
    for _ in range(rounds):
        for x in bins:
            for c in concs:
                if x == "llama":
                    if c != 1:
                        continue
                    n, dt, _ = llama.run(b.prompts(1), 256)
                else:
                    n, dt, _ = procs[x].run(b.prompts(c), 256)
                best[(x, c)] = max(best.get((x, c), 0), n / dt)
                print(f"{x} c={c}: {n / dt:.1f} tok/s ({n} tokens)", flush=True)
    for x, p in procs.items():
        print(x, f"peak RSS {p.peak_mib():.0f} MiB")
        p.close()
    for (x, c), v in best.items():
        print(f"best {x} c={c}: {v:.1f} tok/s")
    print("load", os.getloadavg())


if __name__ == "__main__":
    main()
