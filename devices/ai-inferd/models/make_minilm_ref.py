#!/usr/bin/env python3
"""Writes minilm_ref.json: reference sentence embeddings of all-MiniLM-L6-v2.

An implementation independent of candle, to check the daemon's bert backend against:
the Hugging Face `tokenizers` Python package reads the same tokenizer.json, numpy runs
the BERT encoder in float64 from model.safetensors, then mean pooling over the attention
mask and L2 normalisation, as the package's sentence-transformers pipeline
(modules.json: Transformer, Pooling mean, Normalize) does. Each sentence is encoded
alone, truncated to sentence_bert_config.json's max_seq_length, without padding.

(The package's documented path, sentence_transformers, needs PyTorch: several GB from
PyPI, too heavy for setup.)

Usage: make_minilm_ref.py MODEL_DIR OUT_JSON
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

SENTENCES = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Quarterly revenue rose by four percent compared to last year.",
    "Café déjà vu: a naïve façade, 東京.",
    "hello",
]

erf = np.vectorize(math.erf)


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def linear(x, t, name):
    return x @ t[name + ".weight"].T + t[name + ".bias"]


def encode(ids, t, cfg):
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    eps = cfg["layer_norm_eps"]
    n = len(ids)
    h = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.position_embeddings.weight"][:n]
        + t["embeddings.token_type_embeddings.weight"][0]
    )
    h = layer_norm(h, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    d = hidden // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        split = lambda x: x.reshape(n, heads, d).transpose(1, 0, 2)  # noqa: E731
        q = split(linear(h, t, p + "attention.self.query"))
        k = split(linear(h, t, p + "attention.self.key"))
        v = split(linear(h, t, p + "attention.self.value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)
        a = linear(ctx, t, p + "attention.output.dense")
        h = layer_norm(
            h + a,
            t[p + "attention.output.LayerNorm.weight"],
            t[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        inter = linear(h, t, p + "intermediate.dense")
        inter = 0.5 * inter * (1.0 + erf(inter / math.sqrt(2.0)))
        o = linear(inter, t, p + "output.dense")
        h = layer_norm(h + o, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
    return h


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: make_minilm_ref.py MODEL_DIR OUT_JSON")
    model = Path(sys.argv[1])
    cfg = json.loads((model / "config.json").read_text())
    max_len = json.loads((model / "sentence_bert_config.json").read_text())["max_seq_length"]
    tensors = {
        name.removeprefix("bert."): a.astype(np.float64)
        for name, a in load_file(str(model / "model.safetensors")).items()
    }
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)

    out = []
    for s in SENTENCES:
        ids = tok.encode(s).ids
        pooled = encode(np.array(ids), tensors, cfg).mean(0)  # every token is real: mask = 1
        out.append({"text": s, "tokens": len(ids), "embedding": (pooled / np.linalg.norm(pooled)).tolist()})
    Path(sys.argv[2]).write_text(json.dumps({"sentences": out}) + "\n")
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
