"""Reader of the running kernel's BTF, the source of kfunc ids and struct layouts.

Programs call kfuncs by BTF id and read kernel structs at offsets that change
between builds, so both are looked up in /sys/kernel/btf/vmlinux rather than
written into the compiler. A module's BTF (/sys/kernel/btf/<module>) is "split" on
vmlinux's: its type ids continue after vmlinux's last one and its string offsets
after vmlinux's string section, and its types refer to vmlinux's freely (a struct
a module defines may embed one vmlinux defines). So a module's Btf is read as the
continuation of vmlinux's: one id space and one string space, as the kernel has.

The raw format is a header, then a type section (each record a fixed
``btf_type`` head followed by a kind-specific tail) and a string section.
Type ids are positions in the type section, starting at 1 (0 is void).
Loading makes a single pass that only records where each record starts and
which ids carry which name; records are decoded when asked for.
"""
import os
import struct
import threading

SYSFS_DIR = "/sys/kernel/btf"
VMLINUX_PATH = f"{SYSFS_DIR}/vmlinux"

BTF_MAGIC = 0xEB9F

KINDS = ("void", "int", "ptr", "array", "struct", "union", "enum", "fwd",
         "typedef", "volatile", "const", "restrict", "func", "func_proto",
         "var", "datasec", "float", "decl_tag", "type_tag", "enum64")
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD = 1, 2, 3, 4, 5, 6, 7
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 12, 13, 14, 15, 17, 18, 19

# Bytes that follow the 12-byte head: a fixed tail, or one record per vlen.
_FIXED_TAIL = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_PER_VLEN = {KIND_STRUCT: 12, KIND_UNION: 12, KIND_ENUM: 8, KIND_FUNC_PROTO: 8,
             KIND_DATASEC: 12, KIND_ENUM64: 12}
# Qualifiers and aliases that name another type without changing its layout.
_TRANSPARENT = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)

_HEAD = struct.Struct("<III")
_MEMBER = struct.Struct("<III")
_ENUM = struct.Struct("<Ii")
_ENUM64 = struct.Struct("<III")
_ARRAY = struct.Struct("<III")


class BtfError(LookupError):
    pass


class Btf:
    _vmlinux = None
    _vmlinux_lock = threading.Lock()
    _modules: dict = {}   # sysfs path -> (that file's identity, its Btf)

    def __init__(self, raw: bytes, origin: str = "<bytes>", base: "Btf | None" = None):
        """`base`: the BTF that `raw` is split on (vmlinux's, for a module's)."""
        self.origin = origin
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", raw, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"{origin}: not raw BTF (magic {magic:#x}; only little-endian BTF is read)")
        if version != 1:
            raise BtfError(f"{origin}: BTF version {version} is not supported")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", raw, 8)
        types = raw[hdr_len + type_off:hdr_len + type_off + type_len]
        strings = bytes(raw[hdr_len + str_off:hdr_len + str_off + str_len])
        if base is None:
            self._types = memoryview(types)
            self._strings = strings
            self._offsets = [0]   # id 0 is void and has no record
            self._by_name = {}
            start = 0
        else:
            # Ids and string offsets continue the base's: appending the sections to
            # the base's makes every id and offset of either a plain index.
            start = len(base._types)
            self._types = memoryview(bytes(base._types) + bytes(types))
            self._strings = base._strings + strings
            self._offsets = list(base._offsets)
            self._by_name = {name: ids if isinstance(ids, int) else list(ids)
                             for name, ids in base._by_name.items()}
        self._index(start)

    @classmethod
    def vmlinux(cls) -> "Btf":
        with cls._vmlinux_lock:
            if cls._vmlinux is None:
                with open(VMLINUX_PATH, "rb") as f:
                    cls._vmlinux = cls(f.read(), VMLINUX_PATH)
            return cls._vmlinux

    @classmethod
    def module(cls, name: str) -> "Btf":
        """A loaded module's BTF, split on vmlinux's; BtfError if the module is not
        loaded or has no BTF. Kept while its sysfs file is the same one: a module
        loaded again (perhaps another build, with other ids) gets a new file."""
        path = f"{SYSFS_DIR}/{name}"
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                identity = (st.st_ino, st.st_mtime_ns, st.st_size)
                with cls._vmlinux_lock:
                    cached = cls._modules.get(path)
                if cached is not None and cached[0] == identity:
                    return cached[1]
                raw = f.read()
        except FileNotFoundError:
            raise BtfError(f"{path}: module {name!r} is not loaded, or was built "
                           "without BTF") from None
        btf = cls(raw, path, base=cls.vmlinux())
        with cls._vmlinux_lock:
            cls._modules[path] = identity, btf
        return btf

    def _index(self, pos: int):
        """Records the types from byte `pos` of the type section on."""
        types, strings = self._types, self._strings
        offsets, by_name = self._offsets, self._by_name
        unpack, find = _HEAD.unpack_from, strings.find
        fixed, per_vlen = _FIXED_TAIL, _PER_VLEN
        end = len(types)
        while pos < end:
            name_off, info, _ = unpack(types, pos)
            offsets.append(pos)
            kind = (info >> 24) & 0x1F
            if name_off:
                name = strings[name_off:find(b"\0", name_off)]
                ids = by_name.get(name)
                if ids is None:
                    by_name[name] = len(offsets) - 1
                elif isinstance(ids, int):
                    by_name[name] = [ids, len(offsets) - 1]
                else:
                    ids.append(len(offsets) - 1)
            pos += 12 + fixed.get(kind, 0) + per_vlen.get(kind, 0) * (info & 0xFFFF)

    # -- records --------------------------------------------------------

    def _name(self, off: int) -> str:
        return self._strings[off:self._strings.find(b"\0", off)].decode()

    def _head(self, type_id: int):
        """(name_off, kind, vlen, kind_flag, size_or_type, tail offset) of a type."""
        if not 0 < type_id < len(self._offsets):
            raise BtfError(f"{self.origin}: no type id {type_id}")
        pos = self._offsets[type_id]
        name_off, info, size_or_type = _HEAD.unpack_from(self._types, pos)
        return (name_off, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31,
                size_or_type, pos + 12)

    def kind(self, type_id: int) -> str:
        return KINDS[self._head(type_id)[1]]

    def name(self, type_id: int) -> str:
        return self._name(self._head(type_id)[0])

    def ids(self, name: str) -> list:
        ids = self._by_name.get(name.encode(), [])
        return [ids] if isinstance(ids, int) else list(ids)

    def type_id(self, name: str, kind: str) -> int:
        if kind not in KINDS:
            raise ValueError(f"unknown BTF kind {kind!r}")
        want = KINDS.index(kind)
        for type_id in self.ids(name):
            if self._head(type_id)[1] == want:
                return type_id
        raise BtfError(f"{self.origin}: no {kind} named {name!r}")

    def kfunc_id(self, name: str) -> int:
        try:
            return self.type_id(name, "func")
        except BtfError:
            raise BtfError(f"{self.origin}: kfunc {name!r} is not in the kernel's BTF "
                           "(kernel too old, or built without it)") from None

    def resolve(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the type that has the layout."""
        while True:
            _, kind, _, _, target, _ = self._head(type_id)
            if kind not in _TRANSPARENT:
                return type_id
            type_id = target

    def size(self, type_id: int) -> int:
        type_id = self.resolve(type_id)
        _, kind, _, _, size, tail = self._head(type_id)
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _, nelems = _ARRAY.unpack_from(self._types, tail)
            return nelems * self.size(elem)
        if kind in (KIND_FUNC, KIND_FUNC_PROTO, KIND_FWD):
            raise BtfError(f"{self.origin}: type {type_id} ({KINDS[kind]}) has no size")
        return size

    def _composite(self, name: str) -> int:
        for type_id in self.ids(name):
            if self._head(type_id)[1] in (KIND_STRUCT, KIND_UNION):
                return type_id
        raise BtfError(f"{self.origin}: no struct or union named {name!r}")

    def struct_size(self, name: str) -> int:
        return self.size(self._composite(name))

    def _members(self, type_id: int):
        """(name, type id, bit offset, bitfield size) of a struct/union's members."""
        _, _, vlen, kind_flag, _, tail = self._head(type_id)
        for i in range(vlen):
            name_off, mtype, offset = _MEMBER.unpack_from(self._types, tail + 12 * i)
            if kind_flag:
                yield name_off, mtype, offset & 0xFFFFFF, offset >> 24
            else:
                yield name_off, mtype, offset, 0

    def _find_member(self, type_id: int, name: str):
        """(type id, bit offset, bitfield size) of a member, looking inside anonymous members."""
        for name_off, mtype, bit_off, bits in self._members(type_id):
            if name_off:
                if self._name(name_off) == name:
                    return mtype, bit_off, bits
                continue
            inner = self.resolve(mtype)
            if self._head(inner)[1] in (KIND_STRUCT, KIND_UNION):
                found = self._find_member(inner, name)
                if found is not None:
                    return found[0], bit_off + found[1], found[2]
        return None

    def _walk(self, struct_name: str, path: str):
        """(bit offset, bitfield size, type id, dotted name) of the member at dotted
        ``path``; every part but the last must be a whole-byte member."""
        type_id = self._composite(struct_name)
        where = struct_name
        bit_offset = bits = 0
        for part in path.split("."):
            if bits or bit_offset % 8 or self._int_bitfield(type_id):
                raise BtfError(f"{self.origin}: {where} is a bitfield, it has no member {part!r}")
            container = self.resolve(type_id)
            if self._head(container)[1] not in (KIND_STRUCT, KIND_UNION):
                raise BtfError(f"{self.origin}: {where} is a {self.kind(container)}, "
                               f"it has no member {part!r}")
            found = self._find_member(container, part)
            if found is None:
                raise BtfError(f"{self.origin}: {where} has no member {part!r}")
            type_id, off, bits = found
            where = f"{where}.{part}"
            bit_offset += off
        return bit_offset, bits, type_id, where

    def member(self, struct_name: str, path: str) -> "tuple[int, int]":
        """(byte offset, byte size) of the member at dotted ``path`` in a struct or union."""
        bit_offset, bits, type_id, where = self._walk(struct_name, path)
        if bits or bit_offset % 8 or self._int_bitfield(type_id):
            raise BtfError(f"{self.origin}: {where} is a bitfield, it has no byte offset")
        return bit_offset // 8, self.size(type_id)

    def bitfield(self, struct_name: str, path: str) -> "tuple[int, int]":
        """(bit offset, width in bits) of the bitfield at dotted ``path``: bit offsets
        count from the struct's first byte, least significant bit first (x86 order)."""
        bit_offset, bits, type_id, where = self._walk(struct_name, path)
        if not bits:
            if not self._int_bitfield(type_id):
                raise BtfError(f"{self.origin}: {where} is not a bitfield")
            # Structs without kind_flag keep the width in the int's encoding.
            (encoding,) = struct.unpack_from("<I", self._types, self._head(self.resolve(type_id))[5])
            bit_offset += (encoding >> 16) & 0xFF
            bits = encoding & 0xFF
        return bit_offset, bits

    def _int_bitfield(self, type_id: int) -> bool:
        # Structs without kind_flag encode bitfields in the int's own encoding.
        type_id = self.resolve(type_id)
        _, kind, _, _, size, tail = self._head(type_id)
        if kind != KIND_INT:
            return False
        (encoding,) = struct.unpack_from("<I", self._types, tail)
        return (encoding >> 16) & 0xFF != 0 or encoding & 0xFF != size * 8

    def enum_value(self, enum: str, name: str) -> int:
        candidates = [i for i in self.ids(enum) if self._head(i)[1] in (KIND_ENUM, KIND_ENUM64)]
        if not candidates:
            raise BtfError(f"{self.origin}: no enum named {enum!r}")
        for type_id in candidates:
            value = self.enumerators(type_id).get(name)
            if value is not None:
                return value
        raise BtfError(f"{self.origin}: enum {enum!r} has no value {name!r}")

    def enumerators(self, type_id: int) -> dict:
        _, kind, vlen, signed, _, tail = self._head(type_id)
        out = {}
        for i in range(vlen):
            if kind == KIND_ENUM:
                name_off, value = _ENUM.unpack_from(self._types, tail + 8 * i)
                if not signed:
                    value &= 0xFFFFFFFF
            else:
                name_off, lo, hi = _ENUM64.unpack_from(self._types, tail + 12 * i)
                value = hi << 32 | lo
                if signed and value >> 63:
                    value -= 1 << 64
            out[self._name(name_off)] = value
        return out
