"""Decode speed of llama.cpp (through llama-cpp-python) on a GGUF file, one thread (or THREADS).

Evaluates a short prompt, then generates N tokens greedily one at a time, ignoring
end-of-sequence tokens, and prints one JSON object: {"decode_tokens_per_s": ...}.
The clock covers the decode steps only, as `clusteragent generate --json` reports them.

usage: llamacpp_decode.py MODEL.gguf N [THREADS]
"""

import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def main():
    path, n = sys.argv[1], int(sys.argv[2])
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=64, verbose=False, logits_all=True)
    prompt = llm.tokenize(b"The two machines sat side by side on the shelf, joined by a short cable.", add_bos=True)
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    elapsed = time.perf_counter() - start
    print(json.dumps({"decode_tokens_per_s": (n - 1) / elapsed, "tokens": n}))


if __name__ == "__main__":
    main()
