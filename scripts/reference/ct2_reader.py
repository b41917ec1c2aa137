#!/usr/bin/env python3
"""Minimal reader for CTranslate2 `model.bin` files (binary layout version 6 and older).

Layout (all integers little-endian):
    u32 binary_version
    (version >= 2) string spec_name, u32 spec_revision
    u32 variable_count
    per variable:
        string name
        u8 rank, rank x u32 dims
        (version >= 4) u8 dtype, u32 byte_count      (dtype: 0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16)
        (version <  4) u8 item_size, u32 element_count  (f32 / i8 / i16 by item size)
        raw data
    (version >= 3) u32 alias_count, per alias: string alias, string target
where `string` is u16 length (including a trailing NUL) followed by the bytes.

Quantised weights come with a sibling `<name>_scale` (int8: one scale per output row,
int16: one global scale); `load_ct2(..., dequantize=True)` returns float32 = q / scale for them.

Usage as a script: `python3 ct2_reader.py MODEL.bin` prints every variable.
"""
from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field

import numpy as np

_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: "bf16",
}
_LEGACY_ITEM = {4: np.dtype("<f4"), 2: np.dtype("<i2"), 1: np.dtype("i1")}


@dataclass
class Ct2Model:
    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict = field(default_factory=dict)  # name -> np.ndarray (raw dtype)
    aliases: dict = field(default_factory=dict)  # alias -> target

    def get(self, name: str) -> np.ndarray:
        seen = set()
        while name in self.aliases and name not in self.variables:
            if name in seen:
                raise KeyError(f"alias cycle at {name}")
            seen.add(name)
            name = self.aliases[name]
        return self.variables[name]

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def names(self):
        return list(self.variables) + list(self.aliases)


class _Cursor:
    def __init__(self, buf: bytes):
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ValueError(f"truncated model.bin: need {n} bytes at offset {self.pos}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar("H")
        raw = bytes(self.take(n))
        if raw.endswith(b"\x00"):
            raw = raw[:-1]
        return raw.decode("utf-8")


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_ct2(path: str) -> Ct2Model:
    """Parse model.bin into raw arrays (no dequantisation, no dtype change)."""
    with open(path, "rb") as f:
        buf = f.read()
    c = _Cursor(buf)
    version = c.scalar("I")
    if version > 6:
        raise ValueError(f"unsupported CTranslate2 binary version {version}")
    spec, rev = "", 1
    if version >= 2:
        spec = c.string()
        rev = c.scalar("I")
    model = Ct2Model(version, spec, rev)
    nvars = c.scalar("I")
    for _ in range(nvars):
        name = c.string()
        rank = c.scalar("B")
        dims = tuple(c.scalar("I") for _ in range(rank))
        count = int(np.prod(dims)) if rank else 1
        if version >= 4:
            dt_id = c.scalar("B")
            nbytes = c.scalar("I")
            dt = _DTYPES.get(dt_id)
            if dt is None:
                raise ValueError(f"{name}: unknown dtype id {dt_id}")
        else:
            item = c.scalar("B")
            nbytes = c.scalar("I") * item
            dt = _LEGACY_ITEM[item]
        raw = c.take(nbytes)
        if dt == "bf16":
            arr = _bf16_to_f32(np.frombuffer(raw, dtype="<u2", count=count))
        else:
            if nbytes != count * dt.itemsize:
                raise ValueError(f"{name}: {nbytes} bytes for {dims} of {dt}")
            arr = np.frombuffer(raw, dtype=dt, count=count).copy()
        model.variables[name] = arr.reshape(dims)
    if version >= 3 and c.pos < len(buf):
        nalias = c.scalar("I")
        for _ in range(nalias):
            alias = c.string()
            target = c.string()
            model.aliases[alias] = target
    if c.pos != len(buf):
        raise ValueError(f"{len(buf) - c.pos} trailing bytes in {path}")
    return model


def load_ct2(path: str, dequantize: bool = True, float_dtype=np.float32) -> dict:
    """Return {name: array} with aliases resolved.

    Floating tensors are cast to `float_dtype`; int8/int16 weights that have a `<name>_scale`
    sibling are dequantised as q / scale (per output row for a 1-D scale) and the `_scale`
    entries are dropped. Scalars / integer config values are returned unchanged.
    """
    m = read_ct2(path)
    out = {}
    names = m.names()
    scales = {n[: -len("_scale")] for n in names if n.endswith("_scale")}
    for name in names:
        if dequantize and name.endswith("_scale") and name[: -len("_scale")] in m:
            continue
        arr = m.get(name)
        if dequantize and name in scales and arr.dtype.kind == "i":
            scale = m.get(name + "_scale").astype(np.float64)
            q = arr.astype(np.float64)
            if scale.ndim == 1 and q.ndim >= 1 and scale.shape[0] == q.shape[0]:
                scale = scale.reshape((-1,) + (1,) * (q.ndim - 1))
            arr = (q / scale).astype(float_dtype)
        elif arr.dtype.kind == "f" and arr.ndim > 0:
            arr = arr.astype(float_dtype)
        out[name] = arr
    return out


def main(argv):
    if len(argv) != 2:
        print(__doc__)
        return 2
    m = read_ct2(argv[1])
    print(f"binary_version={m.binary_version} spec={m.spec_name} revision={m.spec_revision}")
    for name, arr in m.variables.items():
        extra = f" = {arr.tolist()}" if arr.size <= 4 else ""
        print(f"{name:70s} {str(arr.dtype):8s} {list(arr.shape)}{extra}")
    for a, t in m.aliases.items():
        print(f"alias {a} -> {t}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
