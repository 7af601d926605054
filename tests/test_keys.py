"""Coordinator keys (raftcoord.keys): byte vectors, round trips, strict decoding, fuzzing.

The byte layouts are fixed by DESIGN.md ("Records and bytes"); the vectors below
are written out by hand from that text, never computed by the code under test.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies import mutated
from raftcoord.errors import DecodeError, KeyFormatError
from raftcoord.keys import (
    CATEGORY_MESSAGE,
    CATEGORY_NODE,
    HEADER_SIZE,
    MESSAGE_KEY_SIZE,
    MESSAGE_PREFIX,
    NODE_PREFIX,
    RESERVED_PREFIXES,
    VALUE_TYPE_CBOR,
    VERSION,
    KeyHeader,
    MessageKey,
    NodeKey,
    decode_key,
    is_reserved,
    prefix_end,
)

MAX_U64 = 2**64 - 1
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

# Valid hostnames: 1-255 bytes of UTF-8, no NUL, no lone surrogates (not encodable).
hostnames = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
    min_size=1,
    max_size=255,
).filter(lambda s: len(s.encode("utf-8")) <= 255)
clocks = st.integers(min_value=0, max_value=MAX_U64)
msg_types = st.integers(min_value=0, max_value=0xFF)
node_keys = st.builds(NodeKey, hostnames)
message_keys = st.builds(MessageKey, clocks, msg_types)


def expect_key_error(fn, data, field):
    """Call ``fn(data)`` and check it raises KeyFormatError naming ``field``."""
    with pytest.raises(KeyFormatError) as info:
        fn(data)
    assert isinstance(info.value, DecodeError)
    assert info.value.field == field, (data, info.value.field, info.value.message)
    return info.value


# ---------------------------------------------------------------------------
# Byte vectors
# ---------------------------------------------------------------------------


def test_header_constants_are_the_fixed_bytes():
    """The node and message prefixes are 'N' 0x11 and 'M' 0x11 (v1, CBOR)."""
    assert CATEGORY_NODE == 0x4E == ord("N")
    assert CATEGORY_MESSAGE == 0x4D == ord("M")
    assert VERSION == 1 and VALUE_TYPE_CBOR == 1
    assert HEADER_SIZE == 2 and MESSAGE_KEY_SIZE == 11
    assert NODE_PREFIX == b"N\x11" == bytes.fromhex("4e11")
    assert MESSAGE_PREFIX == b"M\x11" == bytes.fromhex("4d11")
    assert RESERVED_PREFIXES == (b"N\x11", b"M\x11")


@pytest.mark.parametrize(
    ("category", "expected"),
    [(0x4E, b"\x4e\x11"), (0x4D, b"\x4d\x11")],
)
def test_header_encodes_category_then_version_and_value_type(category, expected):
    """KeyHeader(v1, CBOR) encodes to the category byte then 0x11."""
    assert KeyHeader(category=category).encode() == expected
    assert KeyHeader(category=category, version=1, value_type=1).encode() == expected


@pytest.mark.parametrize(
    ("version", "value_type", "byte1"),
    [(1, 2, 0x12), (2, 1, 0x21), (7, 3, 0x73), (3, 0xF, 0x3F)],
)
def test_header_byte_puts_version_in_high_nibble(version, value_type, byte1):
    """Byte 1 is (version << 4) | value_type, the layout future versions will use."""
    # Only v1/CBOR passes validation today, and for it both nibbles are 1, so a
    # swapped layout would still give 0x11: pin it on headers built unvalidated.
    header = object.__new__(KeyHeader)
    object.__setattr__(header, "category", CATEGORY_NODE)
    object.__setattr__(header, "version", version)
    object.__setattr__(header, "value_type", value_type)
    assert header.encode() == bytes((0x4E, byte1))


@pytest.mark.parametrize(
    ("data", "category"),
    [(b"N\x11", 0x4E), (b"M\x11", 0x4D), (b"N\x11rest-is-ignored", 0x4E)],
)
def test_header_decodes_fixed_bytes(data, category):
    """KeyHeader.decode reads category, version 1 and value type 1 from two bytes."""
    header = KeyHeader.decode(data)
    assert header == KeyHeader(category=category, version=1, value_type=1)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("n1", b"N\x11n1"),
        ("a", bytes.fromhex("4e11" "61")),
        ("node-1.example.com", b"N\x11node-1.example.com"),
        ("10.0.0.7", bytes.fromhex("4e11" "31302e302e302e37")),
        ("\u00f1ode", bytes.fromhex("4e11" "c3b1" "6f6465")),  # n-tilde is c3 b1 in UTF-8
        ("\u65e5", bytes.fromhex("4e11" "e697a5")),  # CJK 'sun', 3 UTF-8 bytes
        ("\U0001f600", bytes.fromhex("4e11" "f09f9880")),  # emoji, 4 UTF-8 bytes
    ],
)
def test_node_key_vectors(host, expected):
    """A node key is 'N' 0x11 followed by the hostname in UTF-8, both ways."""
    assert NodeKey(host).encode() == expected
    assert NodeKey.decode(expected) == NodeKey(host)
    assert decode_key(expected) == NodeKey(host)


def test_node_key_hostname_length_limits():
    """Hostnames of exactly 1 and 255 UTF-8 bytes are accepted."""
    assert NodeKey.decode(b"N\x11" + b"h" * 255).host == "h" * 255
    assert NodeKey("h" * 255).encode() == b"N\x11" + b"h" * 255
    # 127 two-byte characters + 1 ASCII byte = 255 bytes exactly.
    host = "\u00e9" * 127 + "x"
    assert NodeKey(host).encode() == b"N\x11" + b"\xc3\xa9" * 127 + b"x"
    assert NodeKey.decode(b"N\x11" + b"\xc3\xa9" * 127 + b"x").host == host


@pytest.mark.parametrize(
    ("clock", "mtype", "expected"),
    [
        # header | clock, uint64 big-endian | type byte
        (258, ord("O"), bytes.fromhex("4d11" "0000000000000102" "4f")),
        (0, 0, bytes.fromhex("4d11" "0000000000000000" "00")),
        (1, ord("D"), bytes.fromhex("4d11" "0000000000000001" "44")),
        (0x0102030405060708, ord("U"), bytes.fromhex("4d11" "0102030405060708" "55")),
        (2**32, ord("C"), bytes.fromhex("4d11" "0000000100000000" "43")),
        (MAX_U64, 0xFF, bytes.fromhex("4d11" "ffffffffffffffff" "ff")),
        (255, 1, b"M\x11\x00\x00\x00\x00\x00\x00\x00\xff\x01"),
    ],
)
def test_message_key_vectors(clock, mtype, expected):
    """A message key is 'M' 0x11, the clock as 8 big-endian bytes, then the type byte."""
    assert len(expected) == 11
    assert MessageKey(clock, mtype).encode() == expected
    assert MessageKey.decode(expected) == MessageKey(clock, mtype)
    assert decode_key(expected) == MessageKey(clock, mtype)


def test_decoders_accept_bytearray_and_memoryview():
    """Key decoders accept any bytes-like input, not only bytes."""
    raw = bytes.fromhex("4d11" "0000000000000102" "4f")
    assert MessageKey.decode(bytearray(raw)) == MessageKey(258, 79)
    assert decode_key(memoryview(raw)) == MessageKey(258, 79)
    assert decode_key(bytearray(b"N\x11n1")) == NodeKey("n1")
    assert NodeKey.decode(bytearray(b"N\x11n1")) == NodeKey("n1")


def test_message_keys_sort_by_clock_vectors():
    """Hand-written message keys sort by clock first, then by type, as raw bytes."""
    keys = [
        bytes.fromhex("4d11" "0000000000000100" "43"),  # clock 256, 'C'
        bytes.fromhex("4d11" "00000000000000ff" "55"),  # clock 255, 'U'
        bytes.fromhex("4d11" "0000000000000100" "4f"),  # clock 256, 'O'
        bytes.fromhex("4d11" "0000000000000001" "ff"),  # clock 1, 0xff
    ]
    decoded = [MessageKey.decode(k) for k in sorted(keys)]
    assert [(k.clock, k.type) for k in decoded] == [(1, 0xFF), (255, 0x55), (256, 0x43), (256, 0x4F)]


def test_is_reserved():
    """is_reserved is true exactly for keys under N 0x11 or M 0x11."""
    assert is_reserved(b"N\x11n1")
    assert is_reserved(b"N\x11")
    assert is_reserved(bytes.fromhex("4d11" "0000000000000102" "4f"))
    assert not is_reserved(b"N\x12n1")
    assert not is_reserved(b"N\x21n1")
    assert not is_reserved(b"Nn1")
    assert not is_reserved(b"M")
    assert not is_reserved(b"")
    assert not is_reserved(b"user/key")


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        (b"M\x11", b"M\x12"),
        (b"N\x11", b"N\x12"),
        (b"a", b"b"),
        (b"a\xff", b"b"),
        (b"a\xff\xff", b"b"),
        (b"\x00", b"\x01"),
        (b"\xff", b"\x00"),
        (b"\xff\xff", b"\x00"),
        (b"", b"\x00"),
    ],
)
def test_prefix_end_vectors(prefix, end):
    """prefix_end gives the etcd range_end for a prefix ('\\0' when unbounded)."""
    assert prefix_end(prefix) == end


# ---------------------------------------------------------------------------
# Round trips and ordering (hypothesis)
# ---------------------------------------------------------------------------


@given(node_keys)
def test_node_key_round_trip(key):
    """NodeKey encode then decode gives an equal key."""
    raw = key.encode()
    assert raw[:2] == b"N\x11"
    assert raw[2:] == key.host.encode("utf-8")
    assert NodeKey.decode(raw) == key
    assert decode_key(raw) == key


@given(message_keys)
def test_message_key_round_trip(key):
    """MessageKey encode then decode gives an equal key, and is always 11 bytes."""
    raw = key.encode()
    assert len(raw) == 11
    assert raw[:2] == b"M\x11"
    assert int.from_bytes(raw[2:10], "big") == key.clock and raw[10] == key.type
    assert MessageKey.decode(raw) == key
    assert decode_key(raw) == key


@given(st.lists(message_keys, max_size=30))
def test_message_keys_sort_by_clock_then_type(keys):
    """Sorting encoded message keys as bytes orders them by (clock, type)."""
    by_bytes = sorted(keys, key=lambda k: k.encode())
    assert [(k.clock, k.type) for k in by_bytes] == sorted((k.clock, k.type) for k in keys)


@given(message_keys, message_keys)
def test_message_key_byte_order_matches_clock_order(a, b):
    """For two message keys, byte order equals (clock, type) order."""
    assert (a.encode() < b.encode()) == ((a.clock, a.type) < (b.clock, b.type))


@given(st.one_of(message_keys.map(MessageKey.encode), node_keys.map(NodeKey.encode)))
def test_reserved_keys_fall_in_their_prefix_range(raw):
    """Every coordinator key lies in [prefix, prefix_end(prefix)) and is reserved."""
    prefix = raw[:2]
    assert prefix in RESERVED_PREFIXES
    assert prefix <= raw < prefix_end(prefix)
    assert is_reserved(raw)


@given(st.binary(min_size=1, max_size=8), st.binary(max_size=8))
def test_prefix_end_bounds_every_key_with_the_prefix(prefix, rest):
    """Any key starting with prefix is < prefix_end(prefix) (or unbounded)."""
    end = prefix_end(prefix)
    key = prefix + rest
    if end == b"\x00":
        assert set(prefix) == {0xFF}
    else:
        assert prefix <= key < end


# ---------------------------------------------------------------------------
# Strict decoding: the project's own error, naming the field
# ---------------------------------------------------------------------------

ALL_DECODERS = [KeyHeader.decode, NodeKey.decode, MessageKey.decode, decode_key]


@pytest.mark.parametrize("decoder", ALL_DECODERS)
@pytest.mark.parametrize("data", [b"", b"N", b"M", b"\x11"])
def test_short_key_names_header(decoder, data):
    """A key shorter than the 2-byte header raises KeyFormatError on 'header'."""
    expect_key_error(decoder, data, "header")


@pytest.mark.parametrize("decoder", ALL_DECODERS)
@pytest.mark.parametrize(
    "data",
    [b"X\x11", b"n\x11n1", b"m\x11", b"\x00\x11", b"\xff\x11", b"O\x11" + bytes(9), b"K\x11abc"],
)
def test_unknown_category_names_category(decoder, data):
    """An unknown category byte raises KeyFormatError on 'category'."""
    expect_key_error(decoder, data, "category")


@pytest.mark.parametrize("decoder", ALL_DECODERS)
@pytest.mark.parametrize("category", [b"N", b"M"])
def test_reserved_version_zero_names_version(decoder, category):
    """Version 0 is reserved: KeyFormatError on 'version'."""
    err = expect_key_error(decoder, category + b"\x01" + bytes(9), "version")
    assert "reserved" in err.message


@pytest.mark.parametrize("decoder", ALL_DECODERS)
@pytest.mark.parametrize("version", [2, 3, 4, 5, 6, 7])
def test_valid_but_unsupported_versions_name_version(decoder, version):
    """Versions 2-7 are valid by the spec but have no layout yet: error on 'version'."""
    err = expect_key_error(decoder, b"N" + bytes(((version << 4) | 1,)) + b"host", "version")
    assert "unsupported" in err.message
    expect_key_error(decoder, b"M" + bytes(((version << 4) | 1,)) + bytes(9), "version")


@pytest.mark.parametrize("decoder", ALL_DECODERS)
@pytest.mark.parametrize("version", range(8, 16))
def test_out_of_range_versions_name_version(decoder, version):
    """Versions 8-15 are out of range: KeyFormatError on 'version'."""
    expect_key_error(decoder, b"N" + bytes(((version << 4) | 1,)) + b"host", "version")


@pytest.mark.parametrize("decoder", ALL_DECODERS)
@pytest.mark.parametrize("category", [b"N", b"M"])
def test_reserved_value_type_zero_names_value_type(decoder, category):
    """Value type 0 is reserved: KeyFormatError on 'value_type'."""
    err = expect_key_error(decoder, category + b"\x10" + bytes(9), "value_type")
    assert "reserved" in err.message


@pytest.mark.parametrize("decoder", ALL_DECODERS)
@pytest.mark.parametrize("value_type", range(2, 16))
def test_unknown_value_types_name_value_type(decoder, value_type):
    """Value types 2-15 are unknown: KeyFormatError on 'value_type'."""
    expect_key_error(decoder, b"M" + bytes((0x10 | value_type,)) + bytes(9), "value_type")


def test_header_version_checked_before_value_type():
    """With both nibbles wrong (0x00) the version is reported first."""
    expect_key_error(KeyHeader.decode, b"N\x00", "version")
    expect_key_error(KeyHeader.decode, b"N\x20", "version")


def test_wrong_category_for_decoder_names_category():
    """NodeKey.decode refuses a message key and MessageKey.decode a node key ('category')."""
    expect_key_error(NodeKey.decode, bytes.fromhex("4d11" "0000000000000102" "4f"), "category")
    expect_key_error(MessageKey.decode, b"N\x11n1", "category")
    expect_key_error(MessageKey.decode, b"N\x11" + bytes(9), "category")


@pytest.mark.parametrize("decoder", [NodeKey.decode, decode_key])
@pytest.mark.parametrize(
    "hostname",
    [
        b"\xff",  # never valid in UTF-8
        b"n\xfe1",
        b"\xc3",  # truncated two-byte sequence
        b"node\xe6\x97",  # truncated three-byte sequence
        b"\x80abc",  # lone continuation byte
        b"\xc0\x80",  # overlong encoding of NUL
        b"\xc1\xbf",  # overlong encoding
        b"\xed\xa0\x80",  # UTF-16 surrogate U+D800 encoded as UTF-8
        b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    ],
)
def test_bad_utf8_hostname_names_hostname(decoder, hostname):
    """A hostname that is not valid UTF-8 raises KeyFormatError on 'hostname'."""
    expect_key_error(decoder, b"N\x11" + hostname, "hostname")


@pytest.mark.parametrize("decoder", [NodeKey.decode, decode_key])
@pytest.mark.parametrize("hostname", [b"\x00", b"n\x001", b"node\x00", b"\x00node"])
def test_nul_in_hostname_names_hostname(decoder, hostname):
    """A NUL anywhere in the hostname raises KeyFormatError on 'hostname'."""
    expect_key_error(decoder, b"N\x11" + hostname, "hostname")


@pytest.mark.parametrize("decoder", [NodeKey.decode, decode_key])
def test_empty_hostname_names_hostname(decoder):
    """A node key with a header and no hostname raises KeyFormatError on 'hostname'."""
    expect_key_error(decoder, b"N\x11", "hostname")


@pytest.mark.parametrize("decoder", [NodeKey.decode, decode_key])
@pytest.mark.parametrize(
    "hostname",
    [b"h" * 256, b"h" * 1000, b"\xc3\xa9" * 128],  # 256 bytes of two-byte characters
)
def test_hostname_over_255_bytes_names_hostname(decoder, hostname):
    """A hostname longer than 255 bytes raises KeyFormatError on 'hostname'."""
    expect_key_error(decoder, b"N\x11" + hostname, "hostname")


@pytest.mark.parametrize(
    "host",
    ["", "a\x00b", "\x00", "h" * 256, "\u00e9" * 128, "\ud800", "ab\udcff"],
)
def test_node_key_constructor_validates_hostname(host):
    """NodeKey(...) refuses empty, NUL, too long and unencodable hostnames ('hostname')."""
    expect_key_error(NodeKey, host, "hostname")


@pytest.mark.parametrize("host", [None, 1, b"n1", ["n1"]])
def test_node_key_constructor_refuses_non_text(host):
    """NodeKey(...) of a non-str raises KeyFormatError on 'hostname'."""
    expect_key_error(NodeKey, host, "hostname")


@pytest.mark.parametrize("decoder", [MessageKey.decode, decode_key])
@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"M\x11", "clock"),  # header only
        (b"M\x11" + bytes(1), "clock"),
        (b"M\x11" + bytes(7), "clock"),  # clock one byte short
        (b"M\x11" + bytes(8), "type"),  # clock but no type byte
        (b"M\x11" + bytes(10), "type"),  # one byte too many
        (b"M\x11" + bytes(100), "type"),
    ],
)
def test_message_key_wrong_length_names_part(decoder, data, field):
    """A message key that is not exactly 11 bytes raises KeyFormatError on clock/type."""
    expect_key_error(decoder, data, field)


@pytest.mark.parametrize(
    ("clock", "mtype", "field"),
    [
        (-1, 0, "clock"),
        (2**64, 0, "clock"),
        (True, 0, "clock"),
        (1.0, 0, "clock"),
        ("1", 0, "clock"),
        (None, 0, "clock"),
        (0, -1, "type"),
        (0, 256, "type"),
        (0, False, "type"),
        (0, "O", "type"),
        (0, b"O", "type"),
    ],
)
def test_message_key_constructor_validates(clock, mtype, field):
    """MessageKey(...) refuses a clock outside uint64 or a type outside 0-255."""
    with pytest.raises(KeyFormatError) as info:
        MessageKey(clock, mtype)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"category": ord("X")}, "category"),
        ({"category": 0x4E, "version": 0}, "version"),
        ({"category": 0x4E, "version": 2}, "version"),
        ({"category": 0x4E, "version": 8}, "version"),
        ({"category": 0x4E, "value_type": 0}, "value_type"),
        ({"category": 0x4E, "value_type": 2}, "value_type"),
    ],
)
def test_key_header_constructor_validates(kwargs, field):
    """KeyHeader(...) refuses what KeyHeader.decode refuses, naming the same field."""
    with pytest.raises(KeyFormatError) as info:
        KeyHeader(**kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("data", ["N\x11n1", None, 42, ["N", 17]])
def test_decode_key_refuses_non_bytes(data):
    """decode_key of a non-bytes value raises KeyFormatError on 'key'."""
    expect_key_error(decode_key, data, "key")


def test_key_format_error_is_a_decode_error():
    """KeyFormatError is a DecodeError (and a ValueError) with code 'key_format'."""
    assert issubclass(KeyFormatError, DecodeError)
    assert issubclass(KeyFormatError, ValueError)
    assert KeyFormatError.code == "key_format"


# ---------------------------------------------------------------------------
# Fuzzing: arbitrary and mutated bytes give DecodeError or a valid result
# ---------------------------------------------------------------------------


def run_decoder(decoder, data):
    """Run a decoder on untrusted bytes: any exception but DecodeError fails the test."""
    try:
        result = decoder(data)
    except DecodeError:
        return None
    # Whatever decodes must re-encode to exactly the same bytes (canonical forms).
    if decoder == KeyHeader.decode:
        assert result.encode() == bytes(data[:2])
    else:
        assert result.encode() == bytes(data)
    return result


prefixes = st.sampled_from([b"", b"N", b"M", b"N\x11", b"M\x11", b"N\x01", b"M\x10", b"N\x21", b"X\x11"])
key_like_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda p, b: p + b, prefixes, st.binary(max_size=20)),
    st.builds(lambda p, b: p + b, st.just(b"N\x11"), st.binary(min_size=250, max_size=260)),
)


@pytest.mark.parametrize("decoder", ALL_DECODERS, ids=lambda f: f.__qualname__)
@FUZZ
@given(data=key_like_bytes)
def test_fuzz_key_decoders_raise_only_decode_error(decoder, data):
    """Arbitrary bytes either decode (and re-encode identically) or raise DecodeError."""
    run_decoder(decoder, data)




valid_keys = st.one_of(node_keys.map(NodeKey.encode), message_keys.map(MessageKey.encode))


@pytest.mark.parametrize("decoder", ALL_DECODERS, ids=lambda f: f.__qualname__)
@FUZZ
@given(data=mutated(valid_keys))
def test_fuzz_mutated_keys_raise_only_decode_error(decoder, data):
    """Valid keys with bytes flipped/inserted/deleted decode or raise DecodeError only."""
    run_decoder(decoder, data)


# ---------------------------------------------------------------------------
# Regressions for defects found while writing these tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", [KeyHeader.decode, NodeKey.decode, MessageKey.decode], ids=lambda f: f.__qualname__)
@pytest.mark.parametrize("data", ["N\x11n1", None], ids=["str", "None"])
def test_class_decoders_refuse_non_bytes(decoder, data):
    """KeyHeader/NodeKey/MessageKey.decode of a non-bytes value raise KeyFormatError."""
    with pytest.raises(KeyFormatError):
        decoder(data)
