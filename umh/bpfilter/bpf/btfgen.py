"""Raw BTF written by us: the few types the kernel wants to be told about (a spin
lock's place in a map value, the functions of a program that passes callbacks).
btf.py reads the kernel's; this writes ours."""
from __future__ import annotations

import re
import struct

BTF_MAGIC = 0xEB9F
BTF_KIND_INT, BTF_KIND_STRUCT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO = 1, 4, 12, 13
BTF_INT_SIGNED = 1
BTF_FUNC_STATIC = 0


class BtfBuilder:
    """Types are numbered from 1 in the order they are added."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def _name(self, text: str) -> int:
        if not text:
            return 0
        self.strings.extend(text.encode() + b"\0")
        return len(self.strings) - len(text) - 1

    def _add(self, record: bytes) -> int:
        self.types.extend(record)
        self.count += 1
        return self.count

    def integer(self, name: str, size: int, signed: bool) -> int:
        return self._add(struct.pack("<IIII", self._name(name), BTF_KIND_INT << 24, size,
                                     (signed * BTF_INT_SIGNED) << 24 | size * 8))

    def struct(self, name: str, size: int, members: list[tuple[str, int, int]]) -> int:
        """members: (name, type id, bit offset)."""
        head = struct.pack("<III", self._name(name), BTF_KIND_STRUCT << 24 | len(members), size)
        return self._add(head + b"".join(struct.pack("<III", self._name(n), t, bits)
                                         for n, t, bits in members))

    def func_proto(self, returns: int, params: list[tuple[str, int]]) -> int:
        head = struct.pack("<III", 0, BTF_KIND_FUNC_PROTO << 24 | len(params), returns)
        return self._add(head + b"".join(struct.pack("<II", self._name(n), t) for n, t in params))

    def func(self, name: str, proto: int, linkage: int = BTF_FUNC_STATIC) -> int:
        return self._add(struct.pack("<III", self._name(name), BTF_KIND_FUNC << 24 | linkage,
                                     proto))

    def blob(self) -> bytes:
        header = struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(self.types),
                             len(self.types), len(self.strings))
        return header + bytes(self.types) + bytes(self.strings)


def functions_btf(names: list[str]) -> tuple[bytes, list[int]]:
    """BTF declaring one static function per name, each `long f(u64, void *)`-shaped
    enough for the verifier, which only checks that every subprogram has one (static
    functions take their argument types from their callers); and their type ids."""
    b = BtfBuilder()
    long = b.integer("long", 8, True)
    proto = b.func_proto(long, [])
    seen: dict[str, int] = {}
    ids = []
    for name in names:
        ident = re.sub(r"\W", "_", name) or "f"
        if ident[0].isdigit():
            ident = "f_" + ident
        seen[ident] = seen.get(ident, 0) + 1
        if seen[ident] > 1:
            ident = f"{ident}_{seen[ident]}"
        ids.append(b.func(ident, proto))
    return b.blob(), ids
