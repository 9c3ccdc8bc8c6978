"""Generate configs/README.md, the key reference, from the schema's field descriptions.

`make docs-config` rewrites it; tests/test_config.py fails when the committed file is stale.
"""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from megatron.config.schema import SECTIONS

HEADER = """# Config key reference

Generated from `megatron/config/schema.py` by `make docs-config`; do not edit by hand.
Keys are GPT-NeoX's wherever GPT-NeoX has one; hyphenated spellings (`num-layers`) are accepted too.
Files given to `deepy.py` merge in order: a later file overrides an earlier one (nested mappings merge key by
key) and each override is printed. See `docs/config.md` for how this differs from GPT-NeoX.
"""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return _type_name(inner[0]) + ", optional"
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return "`" + json.dumps(value) + "`"


def _table(model: type[BaseModel], own_only: bool) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    names = model.__annotations__ if own_only else model.model_fields
    for name in names:
        f = model.model_fields[name]
        rows.append(f"| `{name}` | {_type_name(f.annotation)} | {_default(f)} | {f.description} |")
    return rows


def render() -> str:
    from megatron.config.schema import OptimizerParams, OptimizerSpec, RopeScaling, ZeroOptimization, DataTypes

    out = [HEADER]
    for section in SECTIONS:
        out += [f"## {section.__name__.removesuffix('Args')}", "", (section.__doc__ or "").strip(), ""]
        out += _table(section, own_only=True) + [""]
    out += ["## Nested mappings", ""]
    for model, key in ((RopeScaling, "rope_scaling"), (OptimizerSpec, "optimizer"),
                       (OptimizerParams, "optimizer.params"), (ZeroOptimization, "zero_optimization"),
                       (DataTypes, "data_types")):
        out += [f"### `{key}`", ""] + _table(model, own_only=False) + [""]
    from megatron.config.schema import Fp8Spec  # the fp8 section (megatron/model/fp8.py)

    out += ["### `fp8`", ""] + _table(Fp8Spec, own_only=False) + [""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
