"""Does a system message stop Qwen2.5-Coder-0.5B from answering textbook-small's prompt with only
a restated question ("Can you explain how to use while loops in Python?", the `too_short` drops)?

    /tmp/peer/bin/python benches/system_message.py SEED GGUF

Through llama.cpp (`llama_cpp_python`, the peer of benches/local_teacher.py) on the same GGUF,
with the local teacher's sampling (temperature 0.7, top-p 0.8, top-k 20, min-p 0.05, penalty
1.05): 60 subjects of seeds/topics.txt drawn with SEED, the prompt of prompts/textbook-small.txt,
once without a system message (the chat template's default) and once with a teacher's; the first
32 tokens of each answer are enough to see whether it starts as a question. Prints the count of
each.
"""
import random, re, sys
from llama_cpp import Llama
topics = [l.strip().split(" > ")[-1] for l in open("seeds/topics.txt") if l.strip() and not l.startswith("#")]
random.seed(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
subjects = random.sample(topics, 60)
body = open("prompts/textbook-small.txt").read().split("\n---\n", 1)[1].strip()
llm = Llama(model_path=sys.argv[2], n_ctx=1024, n_threads=2, verbose=False)
systems = {
    "default": None,
    "teacher": "You are a Python teacher. You answer each question with a detailed explanation and a complete, runnable code example.",
}
for name, system in systems.items():
    restated = 0
    for i, s in enumerate(subjects):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": body.replace("{subject}", s)}]
        out = llm.create_chat_completion(msgs, max_tokens=32, temperature=0.7, top_p=0.8, top_k=20, min_p=0.05, repeat_penalty=1.05, seed=1000 + i)
        text = out["choices"][0]["message"]["content"].strip()
        q = bool(re.match(r"(?i)^(can|could|how|what|would|please)\b", text)) and "?" in text
        restated += q
        if q: print(name, "|", text[:90].replace("\n", " "))
    print(f"{name}: {restated} of {len(subjects)} answers start as a restated question", flush=True)
