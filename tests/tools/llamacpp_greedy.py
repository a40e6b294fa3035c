"""Greedy tokens of llama.cpp (through llama-cpp-python) on a GGUF file, from given prompt ids.

Reads one JSON object on stdin: {"model": PATH, "prompt_ids": [...], "max_tokens": N,
"text": optional string}. Evaluates the prompt, then takes the top token N times (stopping at
none), and prints {"token_ids": [...], "margins": [...]} where margins[i] is the gap between
the best and the second-best logit at step i (a small gap means another build's rounding may
pick the other token), and, when "text" is given, "text_ids": llama.cpp's own tokenization of
it (special tokens parsed, no BOS added).
"""

import json
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama


def last_logits(llm):
    # The context's own logits of the last token evaluated (Llama.scores stays zero in some
    # versions unless every position's logits are kept).
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def greedy(llm, prompt_ids, max_tokens):
    """The greedy tokens after `prompt_ids`, and each step's top-2 logit margin."""
    llm.reset()
    # One token at a time: builds of llama.cpp that detect AMX on virtual CPUs that do not
    # really have it crash on batches (seen here), and a token at a time never takes that path.
    for t in prompt_ids:
        llm.eval([t])
    tokens, margins = [], []
    for _ in range(max_tokens):
        logits = last_logits(llm)
        order = np.argsort(logits)[::-1]
        tokens.append(int(order[0]))
        margins.append(float(logits[order[0]] - logits[order[1]]))
        llm.eval([int(order[0])])
    return tokens, margins


def main():
    req = json.load(sys.stdin)
    llm = Llama(model_path=req["model"], n_threads=2, n_ctx=2048, n_batch=64, verbose=False)
    out = {}
    if "text" in req:
        out["text_ids"] = llm.tokenize(req["text"].encode(), add_bos=False, special=True)
    out["token_ids"], out["margins"] = greedy(llm, req["prompt_ids"], req["max_tokens"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
