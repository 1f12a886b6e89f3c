"""Parity fixtures for phigen's decoder: tiny random-weight models saved by Hugging Face
transformers, with the logits and greedy generations transformers computes for them.

    python scripts/make_fixtures.py            # needs torch and transformers (CPU is enough)
    python scripts/make_fixtures.py --only qwen2   # one case (each case has its own seeds)

Writes tests/fixtures/hf/<case>/{config.json, model.safetensors, expected.safetensors,
expected.json}. The tests in `src/model/tests.rs` load each directory with phigen and compares.
Also tests/fixtures/hf/phi_adamw/: the `phi` model after two `torch.optim.AdamW` steps (weight decay
on matrices but not the embedding, norms or biases; `clip_grad_norm_`) on a fixed batch, with the
losses and gradient norms in adamw.json, for the trainer's optimizer test (`--only adamw` redoes
just this one from the committed `phi` weights).
Weights are drawn with a fixed seed, wider than transformers' init (std 0.3, norms 1 ± 0.3) so
every component moves the logits.
"""
import json
import pathlib

import torch
import transformers
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Phi3ForSequenceClassification, PhiConfig, PhiForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LONGROPE = dict(rope_type="longrope", type="longrope", short_factor=[1.0, 1.3, 1.7, 2.0],
                long_factor=[2.0, 3.0, 5.0, 8.0])

CASES = {
    # phi-1 layout: parallel block, LayerNorm, partial rotary (4 of 8 dims), gelu_new, biases.
    "phi": (PhiForCausalLM, PhiConfig(intermediate_size=64, partial_rotary_factor=0.5, **SMALL), [10, 23]),
    # phi-1.5/2 option: LayerNorm on queries and keys, grouped-query attention.
    "phi_qk_layernorm": (PhiForCausalLM, PhiConfig(intermediate_size=64, partial_rotary_factor=0.5,
                                                   qk_layernorm=True, num_key_value_heads=2, **SMALL), [10]),
    # phi-3: fused qkv, SwiGLU, GQA, LongRoPE (short below 16 positions, long beyond), sliding window 6.
    "phi3_gqa_longrope": (Phi3ForCausalLM, Phi3Config(intermediate_size=48, num_key_value_heads=2,
                                                      original_max_position_embeddings=16, rope_scaling=LONGROPE,
                                                      sliding_window=6, **SMALL), [10, 24]),
    # llama layout: separate q/k/v and gate/up, tied embeddings, GQA, rope_theta 500.
    "llama_tied": (LlamaForCausalLM, LlamaConfig(intermediate_size=48, num_key_value_heads=2, rope_theta=500.0,
                                                 tie_word_embeddings=True, **SMALL), [10]),
    # Sequence classification head over phi-3: 3 labels read at the last non-pad token.
    "phi3_seqcls": (Phi3ForSequenceClassification, Phi3Config(intermediate_size=48, num_key_value_heads=2,
                                                              num_labels=3, **SMALL), [10]),
    # Qwen2 (Qwen2.5-Coder): the llama layout with q/k/v biases (none on o_proj), untied head.
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(intermediate_size=48, num_key_value_heads=2, rope_theta=500.0,
                                            tie_word_embeddings=False, **SMALL), [10]),
}


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)


def greedy(model, prompts, new_tokens):
    """Left-padded batched greedy generation; each row's new ids up to and including EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=2)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(2) + 1] if 2 in row else row)
    return rows


def main(only=None):
    torch.manual_seed(0)
    for seed, (name, (cls, config, lengths)) in enumerate(CASES.items()):
        if only is not None and name != only:
            continue
        config.dtype = torch.float32
        model = cls(config).eval()
        perturb(model, seed)
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        g = torch.Generator().manual_seed(100 + seed)
        tensors, expected = {}, {"transformers": transformers.__version__, "torch": torch.__version__}
        for i, t in enumerate(lengths):
            # Two rows; no pad ids (0) inside, so the classifier reads the last position.
            ids = torch.randint(3, config.vocab_size, (2, t), generator=g)
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            tensors[f"ids_{i}"] = ids.to(torch.int64).contiguous()
            tensors[f"logits_{i}"] = logits.to(torch.float32).contiguous()
        if cls is not Phi3ForSequenceClassification:
            prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (5, 8)]
            expected["single"] = {"prompt": prompts[1], "new": greedy(model, prompts[1:], 12)[0]}
            expected["batch"] = {"prompts": prompts, "new": greedy(model, prompts, 12)}
            if name == "phi3_gqa_longrope":
                # 12 prompt + 10 new positions cross original_max_position_embeddings = 16.
                long = torch.randint(3, config.vocab_size, (12,), generator=g).tolist()
                expected["crossing"] = {"prompt": long, "new": greedy(model, [long], 10)[0]}
        save_file(tensors, d / "expected.safetensors")
        (d / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
        print(name, sum(p.numel() for p in model.parameters()), "parameters")


def adamw():
    """Two AdamW steps on the committed `phi` fixture, as phigen's trainer takes them."""
    src = OUT / "phi"
    model = PhiForCausalLM.from_pretrained(src, dtype=torch.float32).train()
    g = torch.Generator().manual_seed(7)
    batch = torch.randint(3, model.config.vocab_size, (3, 11), generator=g)
    # eps 1e-4, not 1e-8: some gradients are zero up to rounding (the un-rotated half of the key
    # bias cannot change any softmax), and Adam turns rounding noise of 1e-9 into steps of size
    # lr when eps is tiny. With 1e-4 those stay below 1e-7 while eps still shapes real updates.
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-4, weight_decay=0.1, clip=0.5)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "model.embed_tokens.weight"]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != "model.embed_tokens.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hyper["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"])
    losses, norms = [], []
    for _ in range(2):
        opt.zero_grad()
        # labels = inputs: transformers shifts them, so this is the mean next-token loss.
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), hyper["clip"]).item())
        opt.step()
        losses.append(loss.item())
    d = OUT / "phi_adamw"
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    info = dict(hyper, betas=list(hyper["betas"]), batch=batch.tolist(), losses=losses, grad_norms=norms)
    (d / "adamw.json").write_text(json.dumps(info, indent=1) + "\n")
    print("phi_adamw", losses, norms)


if __name__ == "__main__":
    import sys
    only = sys.argv[2] if sys.argv[1:2] == ["--only"] else None
    if only != "adamw":
        main(only)
    if only in (None, "adamw"):
        adamw()
