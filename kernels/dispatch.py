"""How compiled code reaches the block-type table (kernels/blocks.py).

Numba resolves these calls while it compiles: each is a Numba overload whose first argument
is a compile-time integer (a constant in the caller, typically a closure variable), which the
overload looks up in the table to return that block type's kernel. So a kernel built for one
type compiles only that type's code, and the table, not an if-chain of type ids, decides
what runs.

- decode_row(QT, row, cols, f16, out): one row of raw blocks -> float32.
- decode_row_any(MASK, qt, row, cols, f16, out): the same for a type known at run time.
- quantize_row(QT, x, row, f16): float32 -> one row of raw blocks.
- mm(QT, ISA, w, r0, r1, act, t0, t1, out, oc): out[t, oc + r] = row r of w . token t of
  act, for r0 <= r < r1 and t0 <= t < t1, with the best kernel of level ISA (kernels/cpu.py) the
  table has for QT, else the portable one.
- mm_any(MASK, ISA, qt, ...): the same for a block type known only at run time, among the
  types in the bit mask MASK (a model's set of types; bit i is the table's i-th type,
  blocks.type_mask): a chain of tests compiled for just those types.

This module imports no kernels: the table is looked up at compile time, when every module
is loaded, so kernel modules can import it without a cycle.
"""

from numba.core import types
from numba.extending import overload


def _const(v):
    return v.literal_value if isinstance(v, types.IntegerLiteral) else None


def _table(qt):
    from pyllm.kernels.blocks import block_type

    return block_type(qt)


def _split(m: int):
    """(the type of the lowest bit of mask m, m without it)."""
    from pyllm.kernels.blocks import slot_type

    low = (m & -m).bit_length() - 1
    return slot_type(low), m & ~(1 << low)


def decode_row(qt, row, cols, f16, out):
    raise NotImplementedError("only callable from compiled code")


@overload(decode_row, prefer_literal=True)
def _decode_row(qt, row, cols, f16, out):
    if _const(qt) is None:
        return None
    bt = _table(_const(qt))
    decode, n, size = bt.decode, bt.block, bt.nbytes

    def impl(qt, row, cols, f16, out):
        for i in range(cols // n):
            decode(row[size * i:size * i + size], out[n * i:n * i + n], f16)

    return impl


def decode_row_any(mask, qt, row, cols, f16, out):
    raise NotImplementedError("only callable from compiled code")


@overload(decode_row_any, prefer_literal=True)
def _decode_row_any(mask, qt, row, cols, f16, out):
    m = _const(mask)
    if m is None or m == 0:
        return None
    first, rest = _split(m)
    if rest == 0:

        def last(mask, qt, row, cols, f16, out):
            decode_row(first, row, cols, f16, out)

        return last

    def chain(mask, qt, row, cols, f16, out):
        if qt == first:
            decode_row(first, row, cols, f16, out)
        else:
            decode_row_any(rest, qt, row, cols, f16, out)

    return chain


def quantize_row(qt, x, row, f16):
    raise NotImplementedError("only callable from compiled code")


@overload(quantize_row, prefer_literal=True)
def _quantize_row(qt, x, row, f16):
    if _const(qt) is None:
        return None
    q = _table(_const(qt)).quantize_row
    if q is None:
        return None

    def impl(qt, x, row, f16):
        q(x, row, f16)

    return impl


def mm(qt, isa, w, r0, r1, act, t0, t1, out, oc):
    raise NotImplementedError("only callable from compiled code")


@overload(mm, prefer_literal=True)
def _mm(qt, isa, w, r0, r1, act, t0, t1, out, oc):
    if _const(qt) is None or _const(isa) is None:
        return None
    bt = _table(_const(qt))
    fast = bt.kernel(_const(isa))
    if fast is not None:

        def impl(qt, isa, w, r0, r1, act, t0, t1, out, oc):
            fast(w, r0, r1, act, t0, t1, out, oc)

        return impl
    dot = bt.dot

    def portable(qt, isa, w, r0, r1, act, t0, t1, out, oc):
        for r in range(r0, r1):
            row = w[r]
            for t in range(t0, t1):
                out[t, oc + r] = dot(row, act, t)

    return portable


def mm_any(mask, isa, qt, w, r0, r1, act, t0, t1, out, oc):
    raise NotImplementedError("only callable from compiled code")


@overload(mm_any, prefer_literal=True)
def _mm_any(mask, isa, qt, w, r0, r1, act, t0, t1, out, oc):
    m, level = _const(mask), _const(isa)
    if m is None or m == 0 or level is None:
        return None
    first, rest = _split(m)
    if rest == 0:

        def last(mask, isa, qt, w, r0, r1, act, t0, t1, out, oc):
            mm(first, level, w, r0, r1, act, t0, t1, out, oc)

        return last

    def chain(mask, isa, qt, w, r0, r1, act, t0, t1, out, oc):
        if qt == first:
            mm(first, level, w, r0, r1, act, t0, t1, out, oc)
        else:
            mm_any(rest, level, qt, w, r0, r1, act, t0, t1, out, oc)

    return chain


def _source_stamp() -> int:
    """A number that changes whenever any kernel source file changes.

    Numba's cache checks only the timestamp of the file that defines a cached function, not
    of the kernels it calls in other files, so every cached closure of the kernels (the
    per-type products, the compiled step) takes this as a free variable: then a changed
    kernel file means a new cache key, never a stale kernel."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return int.from_bytes(h.digest()[:7], "little")


SOURCE_STAMP = _source_stamp()
