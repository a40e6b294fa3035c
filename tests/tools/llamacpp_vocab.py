"""llama.cpp's own tokenizer test vectors, from the llama-cpp-python sdist on PyPI.

The sdist carries llama.cpp's source, whose models/ folder has vocabulary-only GGUF files
(ggml-vocab-NAME.gguf) and, beside most, NAME.gguf.inp (test strings separated by lines of
__ggml_vocab_test__) and NAME.gguf.out (llama.cpp's ids for each, one line each). Fetched once
(sha256 checked) into CACHE_DIR by pypi_fetch.py; prints CACHE_DIR.

usage: llamacpp_vocab.py CACHE_DIR
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pypi_fetch import fetch  # noqa: E402

VERSION = "0.3.36"

if __name__ == "__main__":
    print(fetch(
        "llama-cpp-python", VERSION, f"llama_cpp_python-{VERSION}.tar.gz",
        "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models/ggml-vocab-", sys.argv[1],
    ))
