"""Deltas between two model variants: the publisher makes them, the fetcher applies them.

A delta is ``MAGIC | method (1 byte) | base sha256 (32) | target sha256 (32) | target size (8, big-endian) |
payload``. Two methods, measured against each other by ``benchmarks/delta.py``:

- ``bsdiff``: bsdiff4's patch (control, diff and extra blocks, each bz2). Smallest on a fine-tuned head:
  it stores the bytewise difference of float weights that moved a little, which compresses well.
- ``zstd``: zstd's ``--patch-from`` (the base as a raw-content dictionary, long-distance matching, a window
  that covers the model). Faster to make and the only one for models larger than bsdiff's 2 GiB limit.

A delta is untrusted input until the result's digest (and signature) is checked: ``apply`` bounds every
size it reads (the target's size, each bz2 block, the zstd window) and checks bsdiff's control tuples
itself before bsdiff4's C code sees them (that code trusts them). The result's digest is checked here too;
the signature is the fetcher's (``fetch.fetch``), exactly as for a full download.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import struct

MAGIC = b"EFDELTA1"
METHODS = {1: "bsdiff", 2: "zstd"}
CODES = {name: code for code, name in METHODS.items()}
HEADER = struct.Struct(">8sB32s32sQ")
MEDIA_TYPE = "application/vnd.edgefleet.delta.v1"
BSDIFF_MAX_BYTES = (1 << 31) - 1  # bsdiff4's C code takes int lengths
ZSTD_LEVEL = 19


class DeltaError(ValueError):
    """A delta that cannot be made or applied: wrong base, malformed, over a limit, or a wrong result."""


def available() -> list[str]:
    """The methods this process can apply (their libraries are installed: the ``delta`` extra)."""
    names = []
    for name, module in (("bsdiff", "bsdiff4"), ("zstd", "zstandard")):
        try:
            __import__(module)
            names.append(name)
        except ImportError:
            pass
    return names


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def make(base: bytes, target: bytes, method: str) -> bytes:
    """The delta that turns ``base`` into ``target`` with ``method`` ("bsdiff" or "zstd")."""
    if method not in CODES:
        raise DeltaError(f"unknown delta method {method!r}; use one of {sorted(CODES)}")
    if method == "bsdiff":
        if max(len(base), len(target)) > BSDIFF_MAX_BYTES:
            raise DeltaError("bsdiff handles models up to 2 GiB; use zstd")
        import bsdiff4

        payload = bsdiff4.diff(base, target)
    else:
        payload = _zstd_make(base, target)
    return HEADER.pack(MAGIC, CODES[method], _sha(base), _sha(target), len(target)) + payload


def make_smallest(base: bytes, target: bytes, methods: list[str] | None = None) -> tuple[str, bytes]:
    """(method, delta) of the method that gives the fewest bytes among ``methods`` (default: all available)."""
    best: tuple[str, bytes] | None = None
    for method in methods or available():
        if method == "bsdiff" and max(len(base), len(target)) > BSDIFF_MAX_BYTES:
            continue
        delta = make(base, target, method)
        if best is None or len(delta) < len(best[1]):
            best = (method, delta)
    if best is None:
        raise DeltaError("no delta method is available: install the delta extra (zstandard, bsdiff4)")
    return best


def _window_log(*sizes: int) -> int:
    """A zstd window that reaches back over the whole base from the end of the target (at most 2 GiB)."""
    return min(31, max(20, sum(sizes).bit_length()))


def _zstd_make(base: bytes, target: bytes) -> bytes:
    import zstandard as zstd

    params = zstd.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL, window_log=_window_log(len(base), len(target)), enable_ldm=True)
    dictionary = zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    return zstd.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(target)


def header(delta: bytes) -> tuple[str, str, str, int]:
    """(method, base digest, target digest, target size) of a delta; DeltaError when it is not one."""
    if len(delta) < HEADER.size:
        raise DeltaError(f"a delta starts with a {HEADER.size}-byte header; this one has {len(delta)} bytes")
    magic, code, base, target, size = HEADER.unpack_from(delta)
    if magic != MAGIC:
        raise DeltaError("not an edgefleet delta (wrong magic)")
    if code not in METHODS:
        raise DeltaError(f"unknown delta method code {code}")
    return METHODS[code], "sha256:" + base.hex(), "sha256:" + target.hex(), size


def apply(base: bytes, delta: bytes, max_bytes: int) -> bytes:
    """The target bytes. DeltaError when the delta is for another base, its target is larger than
    ``max_bytes``, it is malformed, or the result does not have the target digest it names."""
    method, base_digest, target_digest, size = header(delta)
    if "sha256:" + hashlib.sha256(base).hexdigest() != base_digest:
        raise DeltaError(f"the delta is against {base_digest}, not against the base given")
    if size > max_bytes:
        raise DeltaError(f"the delta's target is {size} bytes, over the limit of {max_bytes}")
    payload = delta[HEADER.size:]
    try:
        out = _bsdiff_apply(base, payload, size) if method == "bsdiff" else _zstd_apply(base, payload, size)
    except DeltaError:
        raise
    except Exception as e:  # bz2/zstd/bsdiff4 errors on malformed input
        raise DeltaError(f"malformed {method} delta: {type(e).__name__}: {e}") from None
    if len(out) != size or "sha256:" + hashlib.sha256(out).hexdigest() != target_digest:
        raise DeltaError(f"the {method} delta does not give {target_digest}")
    return out


def _zstd_apply(base: bytes, payload: bytes, size: int) -> bytes:
    import zstandard as zstd

    dictionary = zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    dctx = zstd.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << _window_log(len(base), size))
    with dctx.stream_reader(io.BytesIO(payload)) as reader:  # streams: never allocates what a header claims
        out = reader.read(size + 1)
    if len(out) != size:
        raise DeltaError(f"the zstd delta gives {len(out)} bytes{'+' if len(out) > size else ''}, not {size}")
    return out


def _bz2_block(data: bytes, cap: int, what: str) -> bytes:
    out = bz2.BZ2Decompressor().decompress(data, max_length=cap + 1)
    if len(out) > cap:
        raise DeltaError(f"the bsdiff {what} block unpacks to more than {cap} bytes")
    return out


def _int64(raw: bytes) -> int:
    """bsdiff's signed 64-bit integer: little-endian magnitude, the sign in the top bit."""
    value = int.from_bytes(raw, "little")
    return -(value & ~(1 << 63)) if value >> 63 else value


def _bsdiff_apply(base: bytes, payload: bytes, size: int) -> bytes:
    import bsdiff4.core

    if max(len(base), size) > BSDIFF_MAX_BYTES:
        raise DeltaError("bsdiff deltas are for models up to 2 GiB")
    if len(payload) < 32 or payload[:7] != b"BSDIFF4":
        raise DeltaError("not a bsdiff4 patch")
    len_control, len_diff, len_target = (_int64(payload[i:i + 8]) for i in (8, 16, 24))
    if len_target != size or not (0 <= len_control and 0 <= len_diff and 32 + len_control + len_diff <= len(payload)):
        raise DeltaError("bsdiff header sizes do not fit the delta")
    at = 32
    control = _bz2_block(payload[at:at + len_control], 24 * (size + 1), "control")
    diff = _bz2_block(payload[at + len_control:at + len_control + len_diff], size, "diff")
    extra = _bz2_block(payload[at + len_control + len_diff:], size, "extra")
    _check_controls(control, size, len(diff), len(extra))
    return bsdiff4.core.patch(base, size, control, diff, extra)  # bsdiff4 >= 1.3 takes the raw control block


def _check_controls(control: bytes, size: int, diff_len: int, extra_len: int) -> None:
    """bsdiff's (copy-with-diff, copy-extra, seek) triples, checked: lengths non-negative, every write inside
    the target, and the diff and extra blocks used exactly (bsdiff4's C code bounds only some of these)."""
    if len(control) % 24:
        raise DeltaError("the bsdiff control block is not a whole number of triples")
    written, used_diff, used_extra = 0, 0, 0
    for at in range(0, len(control), 24):
        x, y, z = (_int64(control[at + i:at + i + 8]) for i in (0, 8, 16))
        if x < 0 or y < 0 or abs(z) > BSDIFF_MAX_BYTES:
            raise DeltaError("the bsdiff control block has a negative length or an out-of-range seek")
        written, used_diff, used_extra = written + x + y, used_diff + x, used_extra + y
        if written > size or used_diff > diff_len or used_extra > extra_len:
            raise DeltaError("the bsdiff control block writes past the target or reads past its blocks")
    if (written, used_diff, used_extra) != (size, diff_len, extra_len):
        raise DeltaError("the bsdiff control block does not cover the target exactly")
