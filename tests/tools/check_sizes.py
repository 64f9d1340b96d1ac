#!/usr/bin/env python3
"""Fails if a C++ file under engine/ is too long or has a too-long function.

Usage: check_sizes.py [REPO_ROOT]   (default: the folder above tests/)

Limits: a file (*.cc, *.h) of more than MAX_FILE_LINES lines, or a function
of more than MAX_BODY_LINES lines. Long functions are where a reader loses
the data path; split them into steps with names. Exit status 1 lists each
offender, one line each; 0 when all are within the limits.

How a function is found: the code is formatted Google style
(clang-format), so a definition at namespace scope starts at column 0 and
its body closes with `}` at column 0. A column-0 declaration is read up to
the line that ends it (`;`: a declaration, skipped) or opens its body
(`{`), so multi-line signatures count. Bodies of namespaces, classes,
structs, unions, enums and `extern "C"` are walked into, not measured;
methods defined inside a class body are indented and not measured either
(keep those short by review). A function's length counts from its first
signature line to its closing `}`, both included. Stdlib only.
"""

import os
import re
import sys

MAX_FILE_LINES = 600
MAX_BODY_LINES = 80
EXTENSIONS = (".cc", ".h")

# Heads of blocks that are scopes, not functions: their bodies are walked.
SCOPE_HEAD = re.compile(
    r'^\s*(template\s*<.*>\s*)?'
    r'(inline\s+)?(namespace\b|class\b|struct\b|union\b|enum\b|extern\s+"C")')
# A variable's initializer (`kTable = {`, `x{`), not a function body.
INITIALIZER = re.compile(r'=\s*\{$|^[^(]*\{$')


def function_name(head):
    """A readable name for a function head: the qualified name before the
    parameter list."""
    m = re.search(r'([~\w:<>]+(?:operator\s*[^\s(]+)?)\s*\(', head)
    return m.group(1) if m else head[:60]


def is_decl_start(line):
    """A line at column 0 that begins a declaration or definition (not a
    comment, preprocessor line, closing brace or access label)."""
    return bool(line) and (line[0].isalpha() or line[0] in "_~:") \
        and not re.match(r'^(public|private|protected):', line)


def head_end(lines, i):
    """The index of the line that ends the declaration starting at line i:
    the one that opens its body (`{`) or ends it (`;`). Multi-line
    signatures continue on indented lines; a template head is a line of
    its own. None if nothing ends it within a few lines."""
    for j in range(i, min(i + 20, len(lines))):
        text = lines[j].split("//")[0].rstrip()
        if text.endswith("{") or text.endswith(";") or text.endswith("}"):
            return j
        if j + 1 < len(lines) and lines[j + 1].rstrip() == "{":
            return j + 1
    return None


def long_functions(lines):
    """Yields (start_line, length, name) for each column-0 function whose
    definition, from its first signature line to its closing brace, is
    longer than MAX_BODY_LINES."""
    i = 0
    n = len(lines)
    while i < n:
        if not is_decl_start(lines[i]):
            i += 1
            continue
        j = head_end(lines, i)
        if j is None:
            i += 1
            continue
        head = " ".join(l.strip() for l in lines[i:j + 1])
        last = lines[j].split("//")[0].rstrip()
        if not last.endswith("{"):
            i = j + 1  # a declaration, or a body on the same line
            continue
        if SCOPE_HEAD.match(head):
            i = j + 1  # a namespace or type: walk into its body
            continue
        end = j + 1
        while end < n and not lines[end].startswith("}"):
            end += 1
        length = end - i + 1
        if length > MAX_BODY_LINES and not INITIALIZER.search(head):
            yield i + 1, length, function_name(head)
        i = end + 1


def check_file(path, rel):
    """Returns the messages for one file, empty if it is within limits."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    problems = []
    if len(lines) > MAX_FILE_LINES:
        problems.append(f"{rel}: file has {len(lines)} lines "
                        f"(limit {MAX_FILE_LINES}); split it by concern")
    for start, body, name in long_functions(lines):
        problems.append(f"{rel}:{start}: function {name} is {body} lines "
                        f"long (limit {MAX_BODY_LINES}); split it into "
                        f"named steps")
    return problems


def main(argv):
    root = argv[1] if len(argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..")
    engine = os.path.join(root, "engine")
    if not os.path.isdir(engine):
        print(f"check_sizes: no engine/ folder under {root}", file=sys.stderr)
        return 2
    problems = []
    checked = 0
    for dirpath, dirnames, filenames in os.walk(engine):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            problems += check_file(path, os.path.relpath(path, root))
            checked += 1
    for p in problems:
        print(p)
    if problems:
        print(f"check_sizes: {len(problems)} over the limits in {checked} "
              f"files (files <= {MAX_FILE_LINES} lines, function bodies "
              f"<= {MAX_BODY_LINES} lines)")
        return 1
    print(f"check_sizes: {checked} files within the limits")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
