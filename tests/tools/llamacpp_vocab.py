"""llama.cpp's own tokenizer test vectors, from the llama-cpp-python sdist on PyPI.

The sdist carries llama.cpp's source, whose models/ folder has vocabulary-only GGUF files
(ggml-vocab-NAME.gguf) and, beside most, NAME.gguf.inp (test strings separated by lines of
__ggml_vocab_test__) and NAME.gguf.out (llama.cpp's ids for each, one line each).

Downloads the pinned sdist once, checks its sha256, and extracts those files into CACHE_DIR
(kept between runs); prints CACHE_DIR. Exits non-zero, saying why, when it cannot.

usage: llamacpp_vocab.py CACHE_DIR
"""

import hashlib
import json
import os
import sys
import tarfile
import urllib.parse
import urllib.request

VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MODELS = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models/"


def sdist_url():
    # The project's JSON lists every release; its file addresses may be relative to it.
    index = "https://pypi.org/pypi/llama-cpp-python/json"
    with urllib.request.urlopen(index, timeout=60) as r:
        info = json.load(r)
    for u in info.get("releases", {}).get(VERSION, []):
        if u["packagetype"] == "sdist":
            return urllib.parse.urljoin(index, u["url"])
    raise SystemExit(f"llama-cpp-python {VERSION} has no sdist on PyPI")


def main():
    cache = sys.argv[1]
    done = os.path.join(cache, "extracted")
    if os.path.exists(done):
        print(cache)
        return
    os.makedirs(cache, exist_ok=True)
    archive = os.path.join(cache, f"llama_cpp_python-{VERSION}.tar.gz")
    if not os.path.exists(archive):
        part = archive + ".part"
        with urllib.request.urlopen(sdist_url(), timeout=600) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.rename(part, archive)
    digest = hashlib.sha256(open(archive, "rb").read()).hexdigest()
    if digest != SHA256:
        os.remove(archive)
        raise SystemExit(f"{archive}: sha256 {digest}, expected {SHA256}; removed it")
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(MODELS + "ggml-vocab-") and member.isfile():
                member.name = os.path.basename(name)
                tar.extract(member, cache)
    os.remove(archive)
    open(done, "w").close()
    print(cache)


if __name__ == "__main__":
    main()
