#!/usr/bin/env python3
"""Write the four small JSONL corpora of the replay demo (`make demo-replay`) from text Python ships.

  domain.jsonl         "the field's literature": Python's reference documentation (`pydoc_data.topics`), one
                       document per topic, in sorted order until --domain-chars
  domain_valid.jsonl   every 10th topic, held out from domain.jsonl
  general.jsonl        "general text" (the replay pool): single class/function docstrings of the standard
                       library, one document each, modules in sorted order until --general-chars
  general_valid.jsonl  the next docstrings, until --general-valid-chars (held-out general text)

The general pool is deliberately small (about 1.6 epochs of replay with configs/demo_replay.yml), so the demo
also shows a pool running out and a new permutation starting. Outputs are identical on machines with the same
Python version.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sysconfig
from collections.abc import Iterator

from build_demo_corpus import stdlib_sources, topic_documents  # same folder: the demo corpus's own sources


def docstring_documents(stdlib: str) -> Iterator[str]:
    """Every class/function docstring of 200+ characters, one document each, modules in sorted order."""
    for path in stdlib_sources(stdlib):
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=path)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = os.path.relpath(path, stdlib)[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:  # short ones are mostly "Return self." boilerplate
                    yield f"{module}.{node.name}\n\n{doc}"


def write_jsonl(path: str, texts: list[str]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--domain-chars", type=int, default=200_000)
    parser.add_argument("--general-chars", type=int, default=80_000)
    parser.add_argument("--general-valid-chars", type=int, default=30_000)
    args = parser.parse_args()

    parts: dict[str, list[str]] = {"domain": [], "domain_valid": [], "general": [], "general_valid": []}
    seen: set[str] = set()
    chars = 0
    for i, text in enumerate(topic_documents()):
        if chars >= args.domain_chars:
            break
        if not text or text in seen:
            continue
        seen.add(text)
        if i % 10 == 9:
            parts["domain_valid"].append(text)
        else:
            parts["domain"].append(text)
            chars += len(text)
    limits = {"general": args.general_chars, "general_valid": args.general_valid_chars}
    filled = dict.fromkeys(limits, 0)
    for text in docstring_documents(sysconfig.get_paths()["stdlib"]):
        part = next((p for p in limits if filled[p] < limits[p]), None)
        if part is None:
            break
        if text in seen:
            continue
        seen.add(text)
        parts[part].append(text)
        filled[part] += len(text)

    os.makedirs(args.output_dir, exist_ok=True)
    for name, texts in parts.items():
        write_jsonl(os.path.join(args.output_dir, f"{name}.jsonl"), texts)
        print(f"{name}: {len(texts)} documents, {sum(map(len, texts)) / 1e3:.0f}k characters")


if __name__ == "__main__":
    main()
