#!/usr/bin/env python3
"""Write a small English JSONL corpus from text every Python installation ships, so the demo needs no download.

Sources, in a fixed order:
  1. Python's reference documentation bundled with the interpreter (`pydoc_data.topics`, ~465k characters),
     one document per topic;
  2. docstrings of the standard library, read from its source files with `ast` (nothing is imported), one
     document per module: the module docstring followed by each class's and function's docstring.

Exact duplicates are dropped, and modules are added in sorted order until the target size is reached, so the
output is identical on every machine with the same Python version.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sysconfig
import time
from collections.abc import Iterator

# Test suites and bundled third-party code are not documentation.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def topic_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()


def stdlib_sources(stdlib: str) -> Iterator[str]:
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(root, name)


def module_document(path: str, stdlib: str) -> str:
    """The docstrings of one module as a document; empty when it has none (or cannot be parsed)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    module = os.path.relpath(path, stdlib)[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
    parts = []
    if doc := ast.get_docstring(tree):
        parts.append(f"Module {module}\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:  # one-liners like "Return self." add nothing
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                parts.append(f"{module}: {kind} {node.name}\n\n{doc}")
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write ({'text': ...} per line)")
    parser.add_argument("--target-mb", type=float, default=2.0, help="stop adding modules at this much text")
    args = parser.parse_args()

    start = time.perf_counter()
    target = int(args.target_mb * 1e6)
    stdlib = sysconfig.get_paths()["stdlib"]
    seen: set[bytes] = set()
    counts = {"topics": 0, "modules": 0, "duplicates": 0}
    chars = 0
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = f"{args.output}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:

        def write(text: str, kind: str) -> None:
            nonlocal chars
            digest = hashlib.sha1(text.encode()).digest()
            if digest in seen:
                counts["duplicates"] += 1
                return
            seen.add(digest)
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            counts[kind] += 1
            chars += len(text)

        for text in topic_documents():
            write(text, "topics")
        for path in stdlib_sources(stdlib):
            if chars >= target:
                break
            if text := module_document(path, stdlib):
                write(text, "modules")
    os.replace(tmp, args.output)
    print(
        f"wrote {args.output}: {counts['topics'] + counts['modules']} documents "
        f"({counts['topics']} documentation topics, {counts['modules']} stdlib modules, "
        f"{counts['duplicates']} duplicates dropped), {chars / 1e6:.2f} M characters, "
        f"{os.path.getsize(args.output) / 1e6:.2f} MB in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
