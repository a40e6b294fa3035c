"""Writes a Hugging Face model folder holding exactly the weights of a Llama-architecture GGUF file.

Every tensor is dequantized to float32 with llama.cpp's own reader (the `gguf` package from
PyPI), renamed to transformers' names, and the q/k rows that llama.cpp's converter permuted for
interleaved rotary pairs are put back in transformers' half-split order. The folder has what
users' folders have: `config.json`, `generation_config.json`, `model.safetensors`,
`tokenizer.json` (the file's byte-level BPE vocabulary and merges, split as SmolLM2's published
tokenizer splits: each digit alone, then GPT-2's byte-level expression), and
`tokenizer_config.json` with the file's chat template and special tokens. Only numpy and gguf
are needed (no torch), so tests run it anywhere; the output is the same bytes every time.

usage: gguf_to_hf.py MODEL.gguf OUT_DIR
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType

CONTROL = 3


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    if len(f.data) > 1 or f.types[0] == gguf.GGUFValueType.ARRAY:
        return [field_part(f, i) for i in f.data]
    return field_part(f, f.data[0])


def field_part(f, i):
    part = f.parts[i]
    if part.dtype == np.uint8:
        return bytes(part).decode()
    value = part[0]
    return value.item() if hasattr(value, "item") else value


def shortest(x):
    # The file holds float32: write the shortest decimal that reads back as the same float32
    # (1e-05, as published configs say), not its float64 expansion.
    return float(str(np.float32(x)))


def unpermute(w, heads):
    # llama.cpp's converter turned each head's [first half; second half] rows into interleaved
    # pairs; this is the inverse of that reshape.
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def as_f32(t):
    if t.tensor_type == GGMLQuantizationType.F32:
        data = np.asarray(t.data, dtype=np.float32)
    else:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    # GGUF lists dimensions innermost first; numpy wants them outermost first.
    return data.reshape(tuple(int(d) for d in reversed(t.shape)))


NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(name):
    if name in NAMES:
        return NAMES[name]
    parts = name.split(".")
    if parts[0] != "blk" or parts[2] not in LAYER:
        raise SystemExit(f"tensor {name!r}: no transformers name for it")
    return f"model.layers.{parts[1]}.{LAYER[parts[2]]}.{parts[3]}"


def write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, t in tensors:
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, t in tensors:
            f.write(np.ascontiguousarray(t, dtype="<f4").tobytes())


def tokenizer_json(reader):
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        raise SystemExit("only byte-level BPE (tokenizer.ggml.model = gpt2) files are converted")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (tok, kind) in enumerate(zip(tokens, types))
        if kind == CONTROL
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
        },
        "post_processor": dict(byte_level, trim_offsets=False),
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": merges,
        },
    }


def main():
    src, out = sys.argv[1], Path(sys.argv[2])
    reader = gguf.GGUFReader(src)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"general.architecture is {arch!r}; only llama files are converted")
    heads = field(reader, "llama.attention.head_count")
    kv_heads = field(reader, "llama.attention.head_count_kv")
    tensors = []
    for t in reader.tensors:
        w = as_f32(t)
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, kv_heads)
        tensors.append((hf_name(t.name), w))
    tensors.sort(key=lambda nt: nt[0])
    tied = all(name != "lm_head.weight" for name, _ in tensors)
    tokens = field(reader, "tokenizer.ggml.tokens")
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    pad = field(reader, "tokenizer.ggml.padding_token_id")
    unk = field(reader, "tokenizer.ggml.unknown_token_id")
    hidden = field(reader, "llama.embedding_length")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": field(reader, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": field(reader, "llama.rope.dimension_count") or hidden // heads,
        "max_position_embeddings": field(reader, "llama.context_length"),
        "rms_norm_eps": shortest(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": shortest(field(reader, "llama.rope.freq_base")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "vocab_size": len(tokens),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    }
    tokenizer_config = {
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token")),
        "add_prefix_space": False,
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "pad_token": tokens[pad],
        "unk_token": tokens[unk],
        "chat_template": field(reader, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": field(reader, "llama.context_length"),
        "tokenizer_class": "GPT2Tokenizer",
    }
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors)
    for name, value in [
        ("config.json", config),
        ("generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}),
        ("tokenizer.json", tokenizer_json(reader)),
        ("tokenizer_config.json", tokenizer_config),
    ]:
        with open(out / name, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1, ensure_ascii=False)
            f.write("\n")


if __name__ == "__main__":
    main()
