#!/usr/bin/env python3
"""Fails if a file under engine/ includes a header of a folder that comes
after its own in engine/CMakeLists.txt's add_subdirectory order (an upward
edge), or of a folder not in that order. cli/ may include anything.

Usage: check_layers.py [REPO_ROOT]
"""
import pathlib
import re
import sys


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    engine = root / "engine"
    order = re.findall(r"^add_subdirectory\((\w+)\)", (engine / "CMakeLists.txt").read_text(),
                       re.M)
    if not order:
        print("check_layers: no add_subdirectory() in engine/CMakeLists.txt", file=sys.stderr)
        return 2
    rank = {name: i for i, name in enumerate(order)}
    rank["cli"] = len(order)  # the top: built in engine/CMakeLists.txt itself
    bad = []
    files = sorted(p for p in engine.rglob("*") if p.suffix in (".h", ".cc"))
    for path in files:
        folder = path.relative_to(engine).parts[0]
        if folder not in rank:
            bad.append(f"{path.relative_to(root)}: folder {folder}/ is not in the layer order")
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = re.match(r'\s*#include "engine/(\w+)/', line)
            if m is None:
                continue
            to = m.group(1)
            if to not in rank:
                bad.append(f"{path.relative_to(root)}:{n}: includes unknown folder {to}/")
            elif rank[to] > rank[folder]:
                bad.append(f"{path.relative_to(root)}:{n}: {folder}/ includes {to}/, "
                           f"which comes after it (an upward edge)")
    for b in bad:
        print(b, file=sys.stderr)
    print(f"check_layers: {len(files)} files, {len(order)} layers, {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
