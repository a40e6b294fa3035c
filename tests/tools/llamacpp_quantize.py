"""Quantizes an F32 GGUF file with llama.cpp's own quantizer (llama-quantize's code, through
llama-cpp-python) into each file type people download, and records, for each file: every
tensor's type and a sha256 of its bytes, and llama.cpp's greedy tokens after given prompt ids,
with the eight best logits of each step.

The engine test `files_quantized_by_llama_cpp_...` (agent/engine/tests/gguf_oracle.rs) rebuilds
the same F32 model. For the 32-value block types, F16 and BF16 it quantizes the model with
candle and checks that every tensor is byte for byte the one llama.cpp wrote. llama.cpp's
K-quant quantizer is not candle's (every block differs), so its K files are kept whole in
tests/data/llamacpp/ and read from there. Then every file's stages must give llama.cpp's logits.

Needs llama-cpp-python (pip install llama-cpp-python, which builds llama.cpp from its source)
and the gguf package.

usage: llamacpp_quantize.py F32.gguf OUT.json KEEP_DIR
  F32.gguf: clusteragent make-model --out DIR --arch llama --layers 2 --hidden 256
            --intermediate 256 --heads 4 --kv-heads 2 --seed 1 --max-position 512 --vocab 384
            --gguf f32
"""

import ctypes
import hashlib
import json
import os
import sys
import tempfile

import gguf
import llama_cpp
import numpy as np
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llamacpp_greedy import greedy, last_logits  # noqa: E402

# llama.cpp's file types (llama_ftype): (name, ftype, pure, keep). Pure files hold every matrix
# in that type; the others are llama.cpp's own mixes, as published. Kept files are copied whole
# into KEEP_DIR, for the K types, whose bytes candle's quantizer does not reproduce.
FILE_TYPES = [
    ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True, False),
    ("Q4_1", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, True, False),
    ("Q5_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0, True, False),
    ("Q5_1", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1, True, False),
    ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True, False),
    ("F16", llama_cpp.LLAMA_FTYPE_MOSTLY_F16, True, False),
    ("BF16", llama_cpp.LLAMA_FTYPE_MOSTLY_BF16, True, False),
    ("Q2_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K, False, True),
    ("Q3_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M, False, True),
    ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, False, True),
    ("Q5_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M, False, True),
]
TOP = 8

PROMPT_IDS = [1, 17, 42, 99, 7, 250, 3, 64]
MAX_TOKENS = 16


def tensors(path):
    """Each tensor's name, type name and sha256 of its bytes, in file order."""
    reader = gguf.GGUFReader(path)
    out = []
    for t in reader.tensors:
        digest = hashlib.sha256(bytes(t.data.tobytes())).hexdigest()
        out.append({"name": t.name, "type": t.tensor_type.name, "sha256": digest})
    return out


def quantize(src, dst, ftype, pure):
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 1
    params.ftype = ftype
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {dst}, ftype {ftype}) returned {rc}")


def top_logits(llm, prompt_ids, tokens):
    """The TOP best (id, logit) pairs after the prompt and after each of `tokens` but the last."""
    llm.reset()
    for t in prompt_ids:
        llm.eval([t])
    steps = []
    for t in tokens:
        logits = last_logits(llm)
        order = np.argsort(logits)[::-1][:TOP]
        steps.append([[int(i), float(logits[i])] for i in order])
        llm.eval([t])
    return steps


def main():
    src, out, keep = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(keep, exist_ok=True)
    record = {
        "llama_cpp_python": llama_cpp.__version__,
        "source": tensors(src),
        "prompt_ids": PROMPT_IDS,
        "files": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, ftype, pure, kept in FILE_TYPES:
            dst = os.path.join(keep if kept else tmp, f"{name}.gguf")
            quantize(src, dst, ftype, pure)
            llm = Llama(model_path=dst, n_threads=1, n_ctx=256, n_batch=8, verbose=False)
            tokens, margins = greedy(llm, PROMPT_IDS, MAX_TOKENS)
            top = top_logits(llm, PROMPT_IDS, tokens)
            del llm
            record["files"].append(
                {
                    "name": name,
                    "pure": pure,
                    "kept": f"{name}.gguf" if kept else None,
                    "tensors": tensors(dst),
                    "token_ids": tokens,
                    "margins": margins,
                    "top": top,
                }
            )
            print(f"{name}: {tokens}", file=sys.stderr)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
