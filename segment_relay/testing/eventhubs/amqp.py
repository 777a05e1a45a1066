"""A self-contained AMQP 1.0 codec for the Event Hubs emulator (OASIS AMQP 1.0, 2012).

Covers the type system (spec part 1, "Types"), framing (2.3), the transport, SASL and
messaging composite types (2.7, 5.3, 3.2, 3.4, 3.5) and message sections (3.2).

It deliberately does not import ``azure.eventhub`` or its ``_pyamqp`` package.

Python representation (see :func:`encode_value` / :func:`decode_value`):

* ``None`` = null, ``bool`` = boolean, ``int`` = long, ``float`` = double, ``str`` = string,
  ``bytes`` = binary, ``list``/``tuple`` = list, ``dict`` = map, ``uuid.UUID`` = uuid.
* Wrappers for everything else: :class:`UByte`, :class:`UShort`, :class:`UInt`, :class:`ULong`,
  :class:`Byte`, :class:`Short`, :class:`Int`, :class:`Long`, :class:`Float` (32-bit),
  :class:`Char`, :class:`Timestamp` (ms since the epoch), :class:`Symbol`,
  :class:`Decimal32`/:class:`Decimal64`/:class:`Decimal128` (raw IEEE 754 bytes),
  :class:`Array` and :class:`Described`.

Decoding returns the wrapper types for every AMQP type whose plain-Python default would
encode differently, so ``encode_value(decode_value(b)[0])`` keeps the AMQP types (only the
width of variable or compact encodings may change, to the smallest one).

Every composite (performatives, source/target, delivery states, message header/properties)
is encoded with *all* of its fields, trailing nulls included: the azure-eventhub SDK reads
fixed list positions (for example ``open[9]`` and the transfer payload at index 11).

SDK quirk: the SDK writes and reads an *empty* array without its element constructor
(spec 1.6.24 requires one). :func:`decode_value` accepts both forms; the composite builders
turn an empty symbol list into null, so never hand the SDK an empty :class:`Array`.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AMQP_HEADER",
    "BATCH_MESSAGE_FORMAT",
    "COMPOSITES",
    "SASL_HEADER",
    "Array",
    "Byte",
    "Char",
    "CompositeType",
    "DecodeError",
    "Decimal32",
    "Decimal64",
    "Decimal128",
    "Described",
    "Float",
    "Frame",
    "FrameReader",
    "Int",
    "Long",
    "Message",
    "ProtocolHeader",
    "Short",
    "Symbol",
    "Timestamp",
    "UByte",
    "UInt",
    "ULong",
    "UShort",
    "composite",
    "decode_batch",
    "decode_frame",
    "decode_message",
    "decode_value",
    "encode_batch",
    "encode_frame",
    "encode_message",
    "encode_sections",
    "encode_value",
    "performative",
    "read_composite",
]


class DecodeError(ValueError):
    """Malformed or unsupported AMQP bytes."""


# --------------------------------------------------------------------------------------
# Type wrappers (spec 1.6 "Primitive Type Definitions")
# --------------------------------------------------------------------------------------


class _BoundedInt(int):
    _min = 0
    _max = 0

    def __new__(cls, value: int = 0) -> _BoundedInt:
        v = int.__new__(cls, value)
        if not cls._min <= v <= cls._max:
            raise ValueError(f"{cls.__name__} out of range: {value}")
        return v

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self)})"


class UByte(_BoundedInt):
    """AMQP ubyte (1.6.3)."""

    _max = 0xFF


class UShort(_BoundedInt):
    """AMQP ushort (1.6.4)."""

    _max = 0xFFFF


class UInt(_BoundedInt):
    """AMQP uint (1.6.5)."""

    _max = 0xFFFFFFFF


class ULong(_BoundedInt):
    """AMQP ulong (1.6.6)."""

    _max = 0xFFFFFFFFFFFFFFFF


class Byte(_BoundedInt):
    """AMQP byte (1.6.7)."""

    _min, _max = -(2**7), 2**7 - 1


class Short(_BoundedInt):
    """AMQP short (1.6.8)."""

    _min, _max = -(2**15), 2**15 - 1


class Int(_BoundedInt):
    """AMQP int (1.6.9)."""

    _min, _max = -(2**31), 2**31 - 1


class Long(_BoundedInt):
    """AMQP long (1.6.10); plain ``int`` encodes as long too."""

    _min, _max = -(2**63), 2**63 - 1


class Timestamp(_BoundedInt):
    """AMQP timestamp (1.6.17): signed milliseconds since the Unix epoch."""

    _min, _max = -(2**63), 2**63 - 1


class Float(float):
    """AMQP float (1.6.11), IEEE 754 32-bit; plain ``float`` is double."""

    def __repr__(self) -> str:
        return f"Float({float(self)!r})"


class Char(str):
    """AMQP char (1.6.16): a single unicode character (UTF-32BE)."""

    def __new__(cls, value: str) -> Char:
        if len(value) != 1:
            raise ValueError("Char must be one character")
        return str.__new__(cls, value)


class Symbol(str):
    """AMQP symbol (1.6.21): an ASCII string from a constrained domain."""

    def __repr__(self) -> str:
        return f"Symbol({str(self)!r})"


class Decimal32(bytes):
    """AMQP decimal32 (1.6.13), kept as its 4 raw bytes."""


class Decimal64(bytes):
    """AMQP decimal64 (1.6.14), kept as its 8 raw bytes."""


class Decimal128(bytes):
    """AMQP decimal128 (1.6.15), kept as its 16 raw bytes."""


# Canonical element types of arrays: plain Python types stand for their defaults.
_ELEMENT_ALIASES: dict[type, type] = {Long: int}


@dataclass(eq=True)
class Array:
    """AMQP array (1.6.24): a sequence of values of one type.

    ``element_type`` is the Python/wrapper type of the elements, e.g. ``Symbol``, ``str``,
    ``int`` (long), ``UInt``, ``bool``, ``bytes``, ``list``, ``dict``, ``Array``.
    """

    element_type: type
    items: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.element_type = _ELEMENT_ALIASES.get(self.element_type, self.element_type)
        self.items = list(self.items)


@dataclass(eq=True)
class Described:
    """A described type (1.2): ``0x00`` + descriptor (ulong code or symbol name) + value."""

    descriptor: Any
    value: Any


# --------------------------------------------------------------------------------------
# Encoding (spec 1.6 encodings; smallest encoding chosen)
# --------------------------------------------------------------------------------------

_u8 = struct.Struct(">B")
_u16 = struct.Struct(">H")
_u32 = struct.Struct(">I")
_u64 = struct.Struct(">Q")
_i8 = struct.Struct(">b")
_i16 = struct.Struct(">h")
_i32 = struct.Struct(">i")
_i64 = struct.Struct(">q")
_f32 = struct.Struct(">f")
_f64 = struct.Struct(">d")
_frame_header = struct.Struct(">IBBH")


def _enc_variable(small: int, large: int, data: bytes) -> bytes:
    n = len(data)
    if n <= 0xFF:
        return bytes((small, n)) + data
    return bytes((large,)) + _u32.pack(n) + data


def _enc_compound(small: int, large: int, count: int, body: bytes) -> bytes:
    if count <= 0xFF and len(body) + 1 <= 0xFF:
        return bytes((small, len(body) + 1, count)) + body
    return bytes((large,)) + _u32.pack(len(body) + 4) + _u32.pack(count) + body


def _enc_uint(v: int) -> bytes:
    if v == 0:
        return b"\x43"
    if v <= 0xFF:
        return bytes((0x52, v))
    return b"\x70" + _u32.pack(v)


def _enc_ulong(v: int) -> bytes:
    if v == 0:
        return b"\x44"
    if v <= 0xFF:
        return bytes((0x53, v))
    return b"\x80" + _u64.pack(v)


def _enc_int(v: int) -> bytes:
    if -128 <= v <= 127:
        return b"\x54" + _i8.pack(v)
    return b"\x71" + _i32.pack(v)


def _enc_long(v: int) -> bytes:
    if -128 <= v <= 127:
        return b"\x55" + _i8.pack(v)
    if not -(2**63) <= v < 2**63:
        raise ValueError(f"int out of AMQP long range (wrap it in ULong?): {v}")
    return b"\x81" + _i64.pack(v)


def _enc_list(v: Iterable[Any]) -> bytes:
    items = list(v)
    if not items:
        return b"\x45"
    return _enc_compound(0xC0, 0xD0, len(items), b"".join(encode_value(i) for i in items))


def _enc_map(v: Mapping[Any, Any]) -> bytes:
    body = b"".join(encode_value(k) + encode_value(x) for k, x in v.items())
    return _enc_compound(0xC1, 0xD1, 2 * len(v), body)


def _enc_described(v: Described) -> bytes:
    return b"\x00" + encode_value(v.descriptor) + encode_value(v.value)


def _enc_str(v: str) -> bytes:
    return _enc_variable(0xA1, 0xB1, v.encode("utf-8"))


def _enc_symbol(v: str) -> bytes:
    return _enc_variable(0xA3, 0xB3, v.encode("ascii"))


_ENCODERS: dict[type, Any] = {
    type(None): lambda v: b"\x40",
    bool: lambda v: b"\x41" if v else b"\x42",
    UByte: lambda v: b"\x50" + _u8.pack(v),
    UShort: lambda v: b"\x60" + _u16.pack(v),
    UInt: _enc_uint,
    ULong: _enc_ulong,
    Byte: lambda v: b"\x51" + _i8.pack(v),
    Short: lambda v: b"\x61" + _i16.pack(v),
    Int: _enc_int,
    Long: _enc_long,
    int: _enc_long,
    Float: lambda v: b"\x72" + _f32.pack(v),
    float: lambda v: b"\x82" + _f64.pack(v),
    Decimal32: lambda v: b"\x74" + _check_len(v, 4),
    Decimal64: lambda v: b"\x84" + _check_len(v, 8),
    Decimal128: lambda v: b"\x94" + _check_len(v, 16),
    Char: lambda v: b"\x73" + v.encode("utf-32-be"),
    Timestamp: lambda v: b"\x83" + _i64.pack(v),
    uuid.UUID: lambda v: b"\x98" + v.bytes,
    bytes: lambda v: _enc_variable(0xA0, 0xB0, v),
    bytearray: lambda v: _enc_variable(0xA0, 0xB0, bytes(v)),
    memoryview: lambda v: _enc_variable(0xA0, 0xB0, bytes(v)),
    str: _enc_str,
    Symbol: _enc_symbol,
    list: _enc_list,
    tuple: _enc_list,
    dict: _enc_map,
    Described: _enc_described,
}


def _check_len(v: bytes, n: int) -> bytes:
    if len(v) != n:
        raise ValueError(f"{type(v).__name__} needs {n} bytes")
    return bytes(v)


# Arrays (1.6.24): one constructor, then the element bodies without constructors.
# element type -> (constructor code, body encoder); variable-width types pick 8/32 later.
_ARRAY_FIXED: dict[type, tuple[int, Any]] = {
    bool: (0x56, lambda v: b"\x01" if v else b"\x00"),
    UByte: (0x50, _u8.pack),
    UShort: (0x60, _u16.pack),
    UInt: (0x70, _u32.pack),
    ULong: (0x80, _u64.pack),
    Byte: (0x51, _i8.pack),
    Short: (0x61, _i16.pack),
    Int: (0x71, _i32.pack),
    int: (0x81, _i64.pack),
    Float: (0x72, _f32.pack),
    float: (0x82, _f64.pack),
    Decimal32: (0x74, lambda v: _check_len(v, 4)),
    Decimal64: (0x84, lambda v: _check_len(v, 8)),
    Decimal128: (0x94, lambda v: _check_len(v, 16)),
    Char: (0x73, lambda v: v.encode("utf-32-be")),
    Timestamp: (0x83, _i64.pack),
    uuid.UUID: (0x98, lambda v: v.bytes),
}
_ARRAY_VARIABLE: dict[type, tuple[int, int, Any]] = {
    bytes: (0xA0, 0xB0, bytes),
    str: (0xA1, 0xB1, lambda v: v.encode("utf-8")),
    Symbol: (0xA3, 0xB3, lambda v: v.encode("ascii")),
}


def _enc_compound_32(code: int, count: int, body: bytes) -> bytes:
    return bytes((code,)) + _u32.pack(len(body) + 4) + _u32.pack(count) + body


def _array_parts(arr: Array) -> tuple[bytes, bytes]:
    """(element constructor, concatenated element bodies) of an array."""
    et = arr.element_type
    items = arr.items
    if et in _ARRAY_FIXED:
        code, enc = _ARRAY_FIXED[et]
        return bytes((code,)), b"".join(enc(et(i) if et is not uuid.UUID else i) for i in items)
    if et in _ARRAY_VARIABLE:
        small, large, raw = _ARRAY_VARIABLE[et]
        datas = [raw(i) for i in items]
        if all(len(d) <= 0xFF for d in datas):
            return bytes((small,)), b"".join(bytes((len(d),)) + d for d in datas)
        return bytes((large,)), b"".join(_u32.pack(len(d)) + d for d in datas)
    if et is list:
        bodies = [_enc_compound_32(0xD0, len(i), b"".join(encode_value(x) for x in i))[1:] for i in items]
        return b"\xd0", b"".join(bodies)
    if et is dict:
        bodies = [
            _enc_compound_32(0xD1, 2 * len(i), b"".join(encode_value(k) + encode_value(x) for k, x in i.items()))[1:]
            for i in items
        ]
        return b"\xd1", b"".join(bodies)
    if et is Array:
        out = []
        for i in items:
            ctor, body = _array_parts(i)
            out.append(_u32.pack(len(body) + len(ctor) + 4) + _u32.pack(len(i.items)) + ctor + body)
        return b"\xf0", b"".join(out)
    if et is type(None):
        return b"\x40", b""
    raise TypeError(f"arrays of {et!r} are not supported")


def _enc_array(arr: Array) -> bytes:
    ctor, body = _array_parts(arr)
    count = len(arr.items)
    if count <= 0xFF and len(body) + len(ctor) + 1 <= 0xFF:
        return bytes((0xE0, len(body) + len(ctor) + 1, count)) + ctor + body
    return b"\xf0" + _u32.pack(len(body) + len(ctor) + 4) + _u32.pack(count) + ctor + body


_ENCODERS[Array] = _enc_array


def encode_value(value: Any) -> bytes:
    """Encode one Python value as AMQP bytes (spec 1.2 / 1.6), smallest encoding first."""
    enc = _ENCODERS.get(type(value))
    if enc is None:
        for base, candidate in _ENCODERS.items():
            if base is not type(None) and isinstance(value, base):
                enc = candidate
                break
        else:
            if isinstance(value, Mapping):
                enc = _enc_map
            else:
                raise TypeError(f"cannot AMQP-encode {type(value).__name__}: {value!r}")
    return enc(value)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def _need(data: bytes, end: int) -> None:
    if end > len(data):
        raise DecodeError("truncated AMQP value")


def _dec_fixed(struct_: struct.Struct, wrap: Any) -> Any:
    size = struct_.size

    def dec(data: bytes, pos: int) -> tuple[Any, int]:
        _need(data, pos + size)
        return wrap(struct_.unpack_from(data, pos)[0]), pos + size

    return dec


def _dec_const(value: Any) -> Any:
    return lambda data, pos: (value, pos)


def _dec_bool_byte(data: bytes, pos: int) -> tuple[Any, int]:
    _need(data, pos + 1)
    b = data[pos]
    if b > 1:
        raise DecodeError(f"invalid boolean byte {b:#x}")
    return b == 1, pos + 1


def _dec_var(width: struct.Struct, wrap: Any) -> Any:
    def dec(data: bytes, pos: int) -> tuple[Any, int]:
        _need(data, pos + width.size)
        n = width.unpack_from(data, pos)[0]
        start = pos + width.size
        _need(data, start + n)
        return wrap(data[start : start + n]), start + n

    return dec


def _utf8(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(str(e)) from None


def _sym(b: bytes) -> Symbol:
    try:
        return Symbol(b.decode("ascii"))
    except UnicodeDecodeError as e:
        raise DecodeError(str(e)) from None


def _compound_header(data: bytes, pos: int, width: struct.Struct) -> tuple[int, int, int]:
    """(count, position of first element, end position)."""
    _need(data, pos + 2 * width.size)
    size = width.unpack_from(data, pos)[0]
    count = width.unpack_from(data, pos + width.size)[0]
    end = pos + width.size + size
    _need(data, end)
    if size < width.size:
        raise DecodeError("compound size smaller than its count field")
    return count, pos + 2 * width.size, end


def _dec_list(width: struct.Struct) -> Any:
    def dec(data: bytes, pos: int) -> tuple[Any, int]:
        count, p, end = _compound_header(data, pos, width)
        out = []
        for _ in range(count):
            v, p = _decode_at(data, p)
            out.append(v)
        if p != end:
            raise DecodeError("list size does not match its elements")
        return out, end

    return dec


def _dec_map(width: struct.Struct) -> Any:
    def dec(data: bytes, pos: int) -> tuple[Any, int]:
        count, p, end = _compound_header(data, pos, width)
        if count % 2:
            raise DecodeError("map with an odd element count")
        out: dict[Any, Any] = {}
        for _ in range(count // 2):
            k, p = _decode_at(data, p)
            v, p = _decode_at(data, p)
            try:
                out[k] = v
            except TypeError:
                raise DecodeError(f"unhashable map key {k!r}") from None
        if p != end:
            raise DecodeError("map size does not match its elements")
        return out, end

    return dec


def _dec_array(width: struct.Struct) -> Any:
    def dec(data: bytes, pos: int) -> tuple[Any, int]:
        count, p, end = _compound_header(data, pos, width)
        if count == 0 and p == end:
            # the azure-eventhub SDK writes empty arrays without the element constructor
            # (spec 1.6.24 requires it); accept that, element type unknown
            return Array(type(None), []), end
        _need(data, p + 1)
        code = data[p]
        if code == 0x00:
            raise DecodeError("arrays of described types are not supported")
        element_type = _ARRAY_ELEMENT_TYPES.get(code)
        dec_el = _DECODERS.get(code)
        if element_type is None or dec_el is None:
            raise DecodeError(f"unsupported array element constructor {code:#x}")
        p += 1
        items = []
        for _ in range(count):
            v, p = dec_el(data, p)
            items.append(v)
        if p != end:
            raise DecodeError("array size does not match its elements")
        return Array(element_type, items), end

    return dec


def _dec_described(data: bytes, pos: int) -> tuple[Any, int]:
    descriptor, p = _decode_at(data, pos)
    value, p = _decode_at(data, p)
    return Described(descriptor, value), p


def _dec_uuid(data: bytes, pos: int) -> tuple[Any, int]:
    _need(data, pos + 16)
    return uuid.UUID(bytes=bytes(data[pos : pos + 16])), pos + 16


def _dec_raw(n: int, wrap: Any) -> Any:
    def dec(data: bytes, pos: int) -> tuple[Any, int]:
        _need(data, pos + n)
        return wrap(data[pos : pos + n]), pos + n

    return dec


def _dec_char(b: bytes) -> Char:
    try:
        return Char(b.decode("utf-32-be"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DecodeError(str(e)) from None


_DECODERS: dict[int, Any] = {
    0x00: _dec_described,
    0x40: _dec_const(None),
    0x41: _dec_const(True),
    0x42: _dec_const(False),
    0x56: _dec_bool_byte,
    0x50: _dec_fixed(_u8, UByte),
    0x60: _dec_fixed(_u16, UShort),
    0x70: _dec_fixed(_u32, UInt),
    0x52: _dec_fixed(_u8, UInt),
    0x43: _dec_const(UInt(0)),
    0x80: _dec_fixed(_u64, ULong),
    0x53: _dec_fixed(_u8, ULong),
    0x44: _dec_const(ULong(0)),
    0x51: _dec_fixed(_i8, Byte),
    0x61: _dec_fixed(_i16, Short),
    0x71: _dec_fixed(_i32, Int),
    0x54: _dec_fixed(_i8, Int),
    0x81: _dec_fixed(_i64, int),
    0x55: _dec_fixed(_i8, int),
    0x72: _dec_fixed(_f32, Float),
    0x82: _dec_fixed(_f64, float),
    0x74: _dec_raw(4, Decimal32),
    0x84: _dec_raw(8, Decimal64),
    0x94: _dec_raw(16, Decimal128),
    0x73: _dec_raw(4, _dec_char),
    0x83: _dec_fixed(_i64, Timestamp),
    0x98: _dec_uuid,
    0xA0: _dec_var(_u8, bytes),
    0xB0: _dec_var(_u32, bytes),
    0xA1: _dec_var(_u8, _utf8),
    0xB1: _dec_var(_u32, _utf8),
    0xA3: _dec_var(_u8, _sym),
    0xB3: _dec_var(_u32, _sym),
    0x45: _dec_const(None),  # replaced below: list0 must return a fresh list
    0xC0: _dec_list(_u8),
    0xD0: _dec_list(_u32),
    0xC1: _dec_map(_u8),
    0xD1: _dec_map(_u32),
    0xE0: _dec_array(_u8),
    0xF0: _dec_array(_u32),
}
_DECODERS[0x45] = lambda data, pos: ([], pos)

_ARRAY_ELEMENT_TYPES: dict[int, type] = {
    0x40: type(None),
    0x56: bool,
    0x50: UByte,
    0x60: UShort,
    0x70: UInt,
    0x52: UInt,
    0x43: UInt,
    0x80: ULong,
    0x53: ULong,
    0x44: ULong,
    0x51: Byte,
    0x61: Short,
    0x71: Int,
    0x54: Int,
    0x81: int,
    0x55: int,
    0x72: Float,
    0x82: float,
    0x74: Decimal32,
    0x84: Decimal64,
    0x94: Decimal128,
    0x73: Char,
    0x83: Timestamp,
    0x98: uuid.UUID,
    0xA0: bytes,
    0xB0: bytes,
    0xA1: str,
    0xB1: str,
    0xA3: Symbol,
    0xB3: Symbol,
    0xC0: list,
    0xD0: list,
    0x45: list,
    0xC1: dict,
    0xD1: dict,
    0xE0: Array,
    0xF0: Array,
}


def _decode_at(data: bytes, pos: int) -> tuple[Any, int]:
    _need(data, pos + 1)
    dec = _DECODERS.get(data[pos])
    if dec is None:
        raise DecodeError(f"unknown AMQP constructor {data[pos]:#04x} at offset {pos}")
    return dec(data, pos + 1)  # type: ignore[no-any-return]


def _decode_top(data: bytes, pos: int) -> tuple[Any, int]:
    try:
        return _decode_at(data, pos)
    except RecursionError:
        raise DecodeError("AMQP value nested too deeply") from None


def decode_value(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Any, int]:
    """Decode one AMQP value at ``offset``; returns ``(value, offset after it)`` (spec 1.2).

    Malformed input raises :class:`DecodeError` (never IndexError/struct.error)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    return _decode_top(data, offset)


# --------------------------------------------------------------------------------------
# Composite types (spec 1.4): performatives, SASL frames, terminus, outcomes, sections
# --------------------------------------------------------------------------------------

# field kinds used to coerce plain Python arguments to the spec's field types
_COERCE: dict[str, Any] = {
    "uint": lambda v: v if isinstance(v, UInt) else UInt(v),
    "ushort": lambda v: v if isinstance(v, UShort) else UShort(v),
    "ubyte": lambda v: v if isinstance(v, UByte) else UByte(v),
    "ulong": lambda v: v if isinstance(v, ULong) else ULong(v),
    "bool": bool,
    "string": str,
    "binary": bytes,
    "symbol": lambda v: v if isinstance(v, Symbol) else Symbol(v),
    # empty -> null: the SDK's decoder mis-reads spec-encoded empty arrays (see _dec_array)
    "symbols": lambda v: (
        None
        if not isinstance(v, str) and len(v) == 0
        else v
        if isinstance(v, Array | Symbol)
        else Symbol(v)
        if isinstance(v, str)
        else Array(Symbol, [Symbol(s) for s in v])
    ),
    "fields": lambda v: {Symbol(k) if type(k) is str else k: x for k, x in v.items()},
    "timestamp": lambda v: v if isinstance(v, Timestamp) else Timestamp(v),
    "message-id": lambda v: ULong(v) if type(v) is int else v,
    "any": lambda v: v,
}


@dataclass(frozen=True)
class CompositeType:
    """A composite type: a described list with a fixed, ordered field list (spec 1.4)."""

    name: str
    code: int
    fields: tuple[tuple[str, str], ...]  # (field name with underscores, kind)

    @property
    def descriptor(self) -> ULong:
        return ULong(self.code)

    @property
    def symbol(self) -> Symbol:
        return Symbol(f"amqp:{self.name}:list")

    def build(self, **values: Any) -> Described:
        """All fields in spec order, unset ones as null (trailing nulls are kept)."""
        names = {n for n, _ in self.fields}
        unknown = set(values) - names
        if unknown:
            raise TypeError(f"{self.name} has no field(s) {sorted(unknown)}")
        out: list[Any] = []
        for name, kind in self.fields:
            v = values.get(name)
            out.append(None if v is None else _COERCE[kind](v))
        return Described(self.descriptor, out)

    def read(self, value: Described) -> dict[str, Any]:
        """Fields by name; fields missing at the end (trimmed trailing nulls) read as None."""
        if not isinstance(value, Described) or value.descriptor not in (self.code, self.symbol):
            raise DecodeError(f"not a {self.name}: {value!r}")
        items = value.value if isinstance(value.value, list) else []
        return {name: (items[i] if i < len(items) else None) for i, (name, _) in enumerate(self.fields)}


def _ct(name: str, code: int, spec: str) -> CompositeType:
    fields = tuple((n.replace("-", "_"), k) for n, k in (item.split(":") for item in spec.split()) if n)
    return CompositeType(name, code, fields)


_T = "symbols"
COMPOSITES: dict[str, CompositeType] = {
    ct.name: ct
    for ct in [
        # transport performatives (2.7)
        _ct(
            "open",
            0x10,
            f"container-id:string hostname:string max-frame-size:uint channel-max:ushort idle-time-out:uint "
            f"outgoing-locales:{_T} incoming-locales:{_T} offered-capabilities:{_T} desired-capabilities:{_T} "
            "properties:fields",
        ),
        _ct(
            "begin",
            0x11,
            f"remote-channel:ushort next-outgoing-id:uint incoming-window:uint outgoing-window:uint handle-max:uint "
            f"offered-capabilities:{_T} desired-capabilities:{_T} properties:fields",
        ),
        _ct(
            "attach",
            0x12,
            "name:string handle:uint role:bool snd-settle-mode:ubyte rcv-settle-mode:ubyte source:any target:any "
            "unsettled:any incomplete-unsettled:bool initial-delivery-count:uint max-message-size:ulong "
            f"offered-capabilities:{_T} desired-capabilities:{_T} properties:fields",
        ),
        _ct(
            "flow",
            0x13,
            "next-incoming-id:uint incoming-window:uint next-outgoing-id:uint outgoing-window:uint handle:uint "
            "delivery-count:uint link-credit:uint available:uint drain:bool echo:bool properties:fields",
        ),
        _ct(
            "transfer",
            0x14,
            "handle:uint delivery-id:uint delivery-tag:binary message-format:uint settled:bool more:bool "
            "rcv-settle-mode:ubyte state:any resume:bool aborted:bool batchable:bool",
        ),
        _ct("disposition", 0x15, "role:bool first:uint last:uint settled:bool state:any batchable:bool"),
        _ct("detach", 0x16, "handle:uint closed:bool error:any"),
        _ct("end", 0x17, "error:any"),
        _ct("close", 0x18, "error:any"),
        _ct("error", 0x1D, "condition:symbol description:string info:fields"),
        # delivery states / outcomes (3.4)
        _ct("received", 0x23, "section-number:uint section-offset:ulong"),
        _ct("accepted", 0x24, ""),
        _ct("rejected", 0x25, "error:any"),
        _ct("released", 0x26, ""),
        _ct("modified", 0x27, "delivery-failed:bool undeliverable-here:bool message-annotations:fields"),
        # terminus (3.5)
        _ct(
            "source",
            0x28,
            "address:any durable:uint expiry-policy:symbol timeout:uint dynamic:bool dynamic-node-properties:fields "
            f"distribution-mode:symbol filter:fields default-outcome:any outcomes:{_T} capabilities:{_T}",
        ),
        _ct(
            "target",
            0x29,
            "address:any durable:uint expiry-policy:symbol timeout:uint dynamic:bool dynamic-node-properties:fields "
            f"capabilities:{_T}",
        ),
        # SASL (5.3)
        _ct("sasl-mechanisms", 0x40, f"sasl-server-mechanisms:{_T}"),
        _ct("sasl-init", 0x41, "mechanism:symbol initial-response:binary hostname:string"),
        _ct("sasl-challenge", 0x42, "challenge:binary"),
        _ct("sasl-response", 0x43, "response:binary"),
        _ct("sasl-outcome", 0x44, "code:ubyte additional-data:binary"),
        # message sections that are lists (3.2)
        _ct("header", 0x70, "durable:bool priority:ubyte ttl:uint first-acquirer:bool delivery-count:uint"),
        _ct(
            "properties",
            0x73,
            "message-id:message-id user-id:binary to:any subject:string reply-to:any correlation-id:message-id "
            "content-type:symbol content-encoding:symbol absolute-expiry-time:timestamp creation-time:timestamp "
            "group-id:string group-sequence:uint reply-to-group-id:string",
        ),
    ]
}
_BY_DESCRIPTOR: dict[Any, CompositeType] = {}
for _c in COMPOSITES.values():
    _BY_DESCRIPTOR[_c.code] = _c
    _BY_DESCRIPTOR[_c.symbol] = _c


def composite(name: str, /, **fields: Any) -> Described:
    """Build any composite listed in :data:`COMPOSITES` (e.g. ``"source"``, ``"error"``, ``"accepted"``).

    Field names use underscores (``max_frame_size``); plain ints/strs are coerced to the
    field's declared type (uint, symbol, symbol array, ...). Every field is written.
    """
    return COMPOSITES[name].build(**fields)


performative = composite  # performatives (2.7) and SASL frames (5.3) are composites too


def read_composite(value: Any) -> tuple[str, dict[str, Any]] | None:
    """``(name, fields by name)`` for a known described composite, else ``None``."""
    if not isinstance(value, Described):
        return None
    ct = _BY_DESCRIPTOR.get(value.descriptor) if isinstance(value.descriptor, int | str) else None
    if ct is None:
        return None
    return ct.name, ct.read(value)


# --------------------------------------------------------------------------------------
# Frames (spec 2.3, 5.3.1)
# --------------------------------------------------------------------------------------

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
FRAME_AMQP = 0
FRAME_SASL = 1
MIN_MAX_FRAME_SIZE = 512


@dataclass(frozen=True)
class ProtocolHeader:
    """A protocol header (2.2): ``AMQP`` + protocol id (0 AMQP, 2 TLS, 3 SASL) + version."""

    protocol_id: int
    major: int = 1
    minor: int = 0
    revision: int = 0

    def encode(self) -> bytes:
        return b"AMQP" + bytes((self.protocol_id, self.major, self.minor, self.revision))


@dataclass
class Frame:
    """A decoded frame (2.3.1). ``performative`` is None for an empty (heartbeat) frame."""

    frame_type: int
    channel: int
    performative: Described | None
    payload: bytes = b""

    @property
    def name(self) -> str | None:
        """The composite name, e.g. ``"transfer"`` or ``"sasl-init"``; None if unknown/empty."""
        r = read_composite(self.performative)
        return r[0] if r else None

    @property
    def fields(self) -> dict[str, Any]:
        """The performative's fields by name (empty for a heartbeat)."""
        r = read_composite(self.performative)
        return r[1] if r else {}


def encode_frame(channel: int, performative: Described | None, payload: bytes = b"", frame_type: int = 0) -> bytes:
    """Encode one frame (2.3.1): size, doff=2, type, channel, performative, payload.

    ``performative=None`` gives an empty frame (a heartbeat, 2.4.5). For SASL frames
    (``frame_type=1``) the channel is ignored and written as 0 (5.3.1).
    """
    body = b"" if performative is None else encode_value(performative)
    if payload:
        body += bytes(payload)
    if frame_type == FRAME_SASL:
        channel = 0
    return _frame_header.pack(8 + len(body), 2, frame_type, channel) + body


def decode_frame(
    buffer: bytes | bytearray | memoryview, max_frame_size: int | None = None
) -> tuple[Frame | ProtocolHeader, int] | None:
    """Decode the first frame (or protocol header) in ``buffer``.

    Returns ``(frame, bytes consumed)``, or ``None`` when more bytes are needed.
    A buffer starting with ``b"AMQP"`` yields a :class:`ProtocolHeader` (a frame that large
    would exceed any max-frame-size). Raises :class:`DecodeError` on a malformed frame.
    """
    if len(buffer) < 8:
        return None
    if bytes(buffer[:4]) == b"AMQP":
        return ProtocolHeader(buffer[4], buffer[5], buffer[6], buffer[7]), 8
    size, doff, ftype, channel = _frame_header.unpack_from(buffer, 0)
    if size < 8 or doff < 2 or doff * 4 > size:
        raise DecodeError(f"bad frame header: size={size} doff={doff}")
    if max_frame_size is not None and size > max_frame_size:
        raise DecodeError(f"frame of {size} bytes exceeds max-frame-size {max_frame_size}")
    if len(buffer) < size:
        return None
    body = bytes(buffer[doff * 4 : size])
    if not body:
        return Frame(ftype, channel, None, b""), size
    perf, end = _decode_top(body, 0)
    if not isinstance(perf, Described):
        raise DecodeError(f"frame body is not a described performative: {perf!r}")
    return Frame(ftype, channel, perf, body[end:]), size


class FrameReader:
    """Incremental frame decoder for a byte stream: ``feed(data)`` returns complete frames.

    Partial frames stay buffered until the rest arrives (for an asyncio ``StreamReader`` or
    ``Protocol.data_received``).
    """

    def __init__(self, max_frame_size: int | None = None) -> None:
        self._buf = bytearray()
        self.max_frame_size = max_frame_size

    @property
    def pending(self) -> int:
        """Bytes buffered but not yet part of a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | ProtocolHeader]:
        self._buf += data
        out: list[Frame | ProtocolHeader] = []
        pos = 0
        view = memoryview(self._buf)
        try:
            while True:
                r = decode_frame(view[pos:], self.max_frame_size)
                if r is None:
                    break
                out.append(r[0])
                pos += r[1]
        finally:
            view.release()
        if pos:
            del self._buf[:pos]
        return out


# --------------------------------------------------------------------------------------
# Messages (spec 3.2) and the Event Hubs batch format
# --------------------------------------------------------------------------------------

SECTION_HEADER = 0x70
SECTION_DELIVERY_ANNOTATIONS = 0x71
SECTION_MESSAGE_ANNOTATIONS = 0x72
SECTION_PROPERTIES = 0x73
SECTION_APPLICATION_PROPERTIES = 0x74
SECTION_DATA = 0x75
SECTION_AMQP_SEQUENCE = 0x76
SECTION_AMQP_VALUE = 0x77
SECTION_FOOTER = 0x78
_SECTION_SYMBOLS: dict[str, int] = {
    Symbol("amqp:header:list"): 0x70,
    Symbol("amqp:delivery-annotations:map"): 0x71,
    Symbol("amqp:message-annotations:map"): 0x72,
    Symbol("amqp:properties:list"): 0x73,
    Symbol("amqp:application-properties:map"): 0x74,
    Symbol("amqp:data:binary"): 0x75,
    Symbol("amqp:amqp-sequence:list"): 0x76,
    Symbol("amqp:amqp-value:*"): 0x77,
    Symbol("amqp:footer:map"): 0x78,
}

#: transfer message-format of an Event Hubs / Service Bus batch: each data section of the
#: outer message is one complete encoded message.
BATCH_MESSAGE_FORMAT = 0x80013700


@dataclass
class Message:
    """A bare/annotated message (3.2) split into its sections.

    ``header`` and ``properties`` are dicts by field name (underscores). The body is
    ``data`` (list of bytes), ``sequence`` (list of lists) or, when ``has_value``, ``value``.
    """

    header: dict[str, Any] | None = None
    delivery_annotations: dict[Any, Any] | None = None
    message_annotations: dict[Any, Any] | None = None
    properties: dict[str, Any] | None = None
    application_properties: dict[Any, Any] | None = None
    data: list[bytes] = field(default_factory=list)
    sequence: list[list[Any]] = field(default_factory=list)
    value: Any = None
    has_value: bool = False
    footer: dict[Any, Any] | None = None


def _annotations(v: Mapping[Any, Any]) -> dict[Any, Any]:
    # annotation keys are symbols (or ulongs) (3.2.10)
    return {Symbol(k) if type(k) is str else k: x for k, x in v.items()}


def encode_message(message: Message) -> bytes:
    """Encode a message's sections in spec order (3.2): header, delivery-annotations,
    message-annotations, properties, application-properties, body, footer."""
    out: list[bytes] = []
    if message.header is not None:
        out.append(encode_value(COMPOSITES["header"].build(**message.header)))
    if message.delivery_annotations is not None:
        out.append(encode_value(Described(ULong(0x71), _annotations(message.delivery_annotations))))
    if message.message_annotations is not None:
        out.append(encode_value(Described(ULong(0x72), _annotations(message.message_annotations))))
    if message.properties is not None:
        out.append(encode_value(COMPOSITES["properties"].build(**message.properties)))
    if message.application_properties is not None:
        out.append(encode_value(Described(ULong(0x74), dict(message.application_properties))))
    bodies = (bool(message.data), bool(message.sequence), message.has_value)
    if sum(bodies) > 1:
        raise ValueError("a message body is data, amqp-sequence or amqp-value, not several")
    for d in message.data:
        out.append(encode_value(Described(ULong(0x75), bytes(d))))
    for s in message.sequence:
        out.append(encode_value(Described(ULong(0x76), list(s))))
    if message.has_value:
        out.append(encode_value(Described(ULong(0x77), message.value)))
    if message.footer is not None:
        out.append(encode_value(Described(ULong(0x78), _annotations(message.footer))))
    return b"".join(out)


def encode_sections(*sections: Described) -> bytes:
    """Concatenate already-built section values (e.g. ``Described(ULong(0x75), b"...")``)."""
    return b"".join(encode_value(s) for s in sections)


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Decode the concatenated sections of a message (3.2) into a :class:`Message`."""
    data = bytes(data)
    msg = Message()
    pos = 0
    while pos < len(data):
        section, pos = _decode_top(data, pos)
        if not isinstance(section, Described):
            raise DecodeError(f"message section is not described: {section!r}")
        d = section.descriptor
        code = _SECTION_SYMBOLS.get(d) if isinstance(d, str) else d
        v = section.value
        if code == SECTION_HEADER:
            msg.header = COMPOSITES["header"].read(section)
        elif code == SECTION_DELIVERY_ANNOTATIONS:
            msg.delivery_annotations = v
        elif code == SECTION_MESSAGE_ANNOTATIONS:
            msg.message_annotations = v
        elif code == SECTION_PROPERTIES:
            msg.properties = COMPOSITES["properties"].read(section)
        elif code == SECTION_APPLICATION_PROPERTIES:
            msg.application_properties = v
        elif code == SECTION_DATA:
            msg.data.append(v)
        elif code == SECTION_AMQP_SEQUENCE:
            msg.sequence.append(v)
        elif code == SECTION_AMQP_VALUE:
            msg.value, msg.has_value = v, True
        elif code == SECTION_FOOTER:
            msg.footer = v
        else:
            raise DecodeError(f"unknown message section {d!r}")
    return msg


def decode_batch(data: bytes | bytearray | memoryview) -> list[Message]:
    """Decode a batch payload (transfer ``message-format`` :data:`BATCH_MESSAGE_FORMAT`):
    each data section of the outer message is one complete encoded message."""
    return [decode_message(d) for d in decode_message(data).data]


def encode_batch(messages: Iterable[Message], message_annotations: Mapping[Any, Any] | None = None) -> bytes:
    """The inverse of :func:`decode_batch`: an envelope with one data section per message."""
    envelope = Message(
        message_annotations=dict(message_annotations) if message_annotations is not None else None,
        data=[encode_message(m) for m in messages],
    )
    return encode_message(envelope)
