"""Read and write sharded safetensors one tensor at a time.

Reading: shard headers are parsed up front (names, shapes, dtypes: a few KB each, no tensor data), so a missing
shard, an index that names a tensor its shard lacks, or a shape that disagrees with config.json is reported before
anything is converted. Each tensor is then read through its own short-lived `safe_open`, so mapped pages of a
finished shard are released instead of accumulating in the resident set.

Writing: the shard plan (which tensor goes to which file, at which byte offset) is computed from the shapes before
any weight exists, so each shard's header is written first and every tensor is appended the moment it is produced.
Nothing is buffered: the writer holds no tensor, whatever the shard size.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron.checkpoint.hf_config import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_ST_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_HEADER_LIMIT = 100 * 2**20  # the safetensors library refuses larger headers too


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConversionError(f"{path}: truncated safetensors file ({len(raw)} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _HEADER_LIMIT:
                raise ConversionError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
            size = f.seek(0, os.SEEK_END)
    except FileNotFoundError:
        raise ConversionError(f"safetensors shard {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ConversionError(f"{path}: truncated ({size} bytes, the header describes {8 + n + end})")
    return header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple
    dtype: str  # safetensors dtype code (BF16, F32, ...)


class SafetensorsSource:
    """The tensors of a HF model directory: `model.safetensors.index.json` and its shards, or one
    `model.safetensors`."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a safetensors index ({e})") from None
        elif (self.dir / SINGLE_NAME).is_file():
            weight_map = None
        else:
            present = sorted(p.name for p in self.dir.glob("*.safetensors"))
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = (f"found {', '.join(present[:3])} but no {INDEX_NAME}" if present else
                    f"found only PyTorch .bin files ({', '.join(bins[:3])}); re-save the model with "
                    "save_pretrained(..., safe_serialization=True)" if bins else "no .safetensors files at all")
            raise ConversionError(f"{self.dir}: neither {INDEX_NAME} nor {SINGLE_NAME} ({hint})")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise ConversionError(f"{self.dir}: {len(missing)} of the {len(files)} shards named in {INDEX_NAME} "
                                  f"are missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            path = self.dir / fname
            for name, info in read_header(path).items():
                if name == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(name) != fname:
                    continue  # the index is authoritative about where a tensor lives
                self.tensors[name] = TensorInfo(name, path, tuple(info["shape"]), info["dtype"])
        if weight_map is not None:
            absent = [f"{n} (index: {f})" for n, f in weight_map.items() if n not in self.tensors]
            if absent:
                raise ConversionError(f"{index}: {len(absent)} tensors named in the index are not in their shard: "
                                      + ", ".join(absent[:5]))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self.tensors[name]
        with safe_open(str(info.file), framework="pt") as f:
            # get_tensor copies out of the mapping; closing drops the mapping, so the resident set only holds
            # the tensors still in use.
            return f.get_tensor(name)


# ---------------------------------------------------------------------------------------------------- writing
def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' → bytes (HF's decimal units; *iB are binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r}; write e.g. 5GB, 500MB or a number of bytes")
    unit = m.group(2).upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def shard_plan(entries: list[tuple[str, tuple]], dtype: torch.dtype, max_shard_bytes: int) -> list[list]:
    """Split (name, shape) entries, in order, into shards of at most max_shard_bytes (a bigger tensor goes alone)."""
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list] = [[]]
    size = 0
    for name, shape in entries:
        n = item * int(torch.Size(shape).numel())
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape)))
        size += n
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class ShardedWriter:
    """Writes the planned shards; `write(name, tensor)` must follow the plan's order. Each shard is written under a
    temporary name and renamed when complete, and the index last, so a killed export leaves no loadable model."""

    def __init__(self, out_dir: Path, plan: list[list], dtype: torch.dtype):
        self.dir, self.plan, self.dtype = Path(out_dir), plan, dtype
        self.code = _ST_DTYPES[dtype]
        self.item = torch.empty((), dtype=dtype).element_size()
        self.order = [(s, name, shape) for s, shard in enumerate(plan) for name, shape in shard]
        self.pos = 0
        self.file = None
        self.current: Optional[int] = None
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.total_params = 0

    def _open(self, s: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in self.plan[s]:
            n = self.item * int(torch.Size(shape).numel())
            header[name] = {"dtype": self.code, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the library writes it
        self.tmp = self.dir / (shard_name(s, len(self.plan)) + ".partial")
        self.file = open(self.tmp, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.expected_end = 8 + len(raw) + offset
        self.current = s

    def _close_current(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.file.tell() != self.expected_end:
            raise RuntimeError(f"{self.tmp}: wrote {self.file.tell()} bytes, planned {self.expected_end}")
        self.file.close()
        os.replace(self.tmp, self.dir / shard_name(self.current, len(self.plan)))
        self.file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        s, want, shape = self.order[self.pos]
        if name != want or tuple(tensor.shape) != shape:
            raise RuntimeError(f"writer expected {want} {shape} next, got {name} {tuple(tensor.shape)}")
        if self.current != s:
            if self.file is not None:
                self._close_current()
            self._open(s)
        t = tensor.detach().to(self.dtype).contiguous().reshape(-1)
        self.file.write(t.view(torch.uint8).numpy().data)
        self.weight_map[name] = shard_name(s, len(self.plan))
        self.total_bytes += t.numel() * self.item
        self.total_params += t.numel()
        self.pos += 1

    def abort(self) -> None:
        """After a failure: the shard being written is removed (the finished ones stay, under their final names,
        without the index no loader takes them for a model)."""
        if self.file is not None:
            self.file.close()
            self.file = None
            self.tmp.unlink(missing_ok=True)

    def close(self) -> Path:
        if self.pos != len(self.order):
            raise RuntimeError(f"only {self.pos} of {len(self.order)} tensors were written")
        if self.file is not None:
            self._close_current()
        index = {"metadata": {"total_parameters": self.total_params, "total_size": self.total_bytes},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        path = self.dir / INDEX_NAME
        path.write_text(json.dumps(index, indent=2) + "\n")
        return path
