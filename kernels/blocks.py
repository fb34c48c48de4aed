"""The table of block types: for each GGML type, the kernels that decode, multiply and quantize it.

Format facts (type id, elements and bytes per block) live in pyllm.base (GGMLType, BLOCK_SIZE);
this table adds the code. Everything that depends on the block type goes through it:
dequantize/get_rows (kernels/quants.py), the products (kernels/matmul.py and the compiled
step, kernels/forward.py) and quantize (kernels/quantize.py), by way of the compile-time
dispatch in kernels/dispatch.py.

To add a block type: give it an id and a BLOCK_SIZE entry in base.py, write its block
decoder (bit-exact to the format's reference), its portable dot against the activation
it pairs with, optionally SIMD kernels and a row quantizer, and register one BlockType:

    register(BlockType(GGMLType.NF4, decode=decode_nf4, act=ACT_Q8_0, dot=dot_nf4,
                       simd={AVX2: mm_nf4_avx2}, quantize_row=row_nf4))

A type may also name an interleaved layout (repack=(layout id, function)) with faster kernels:
the compiled step repacks such weights once at load, where the host runs those kernels.

Kernel signatures (all Numba functions):
    decode(block: uint8[nbytes], out: float32[block], f16_table)           one block -> floats
    dot(row: uint8[row_bytes], act: Act, t) -> float32                     row . token t
    simd[level](w: uint8 (rows, row_bytes), r0, r1, act, t0, t1, out, oc) out[t, oc + r], a tile
    quantize_row(x: float32[cols], row: uint8[row_bytes], f16_table)       floats -> one row
The activation forms (act=ACT_*) are described in kernels/act.py.
"""

from dataclasses import dataclass, field

from pyllm.base import BLOCK_SIZE, GGMLType
from pyllm.kernels import dots, lowbit, quantize, quants
from pyllm.kernels.act import ACT_F32, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K
from pyllm.kernels.cpu import AVX2, AVX512VNNI, isa_supported

# Ids of the interleaved layouts (eight rows per group, repacked at load): not GGUF types, so
# above every ggml_type id (and below pyllm's own types, 1000 on).
Q4_0X8, Q4_1X8, Q8_0X8, Q5_0X8, Q5_1X8, NF4X8, Q4_KX8, Q6_KX8 = 48, 49, 50, 51, 52, 53, 54, 55


@dataclass(frozen=True)
class BlockType:
    qtype: int  # a GGMLType, or one of the layout ids above
    decode: object
    act: int
    dot: object
    simd: dict = field(default_factory=dict)  # kernel level (kernels/cpu.py) -> tile kernel
    quantize_row: object = None
    repack: tuple = None  # (layout id, data -> repacked data): a layout with faster kernels
    label: str = ""  # the name of a layout (GGML types have theirs)
    check: object = None  # check(x, qtype) before quantizing a whole tensor: raises ValueError

    @property
    def name(self) -> str:
        return self.label or GGMLType(self.qtype).name

    @property
    def block(self) -> int:
        return BLOCK_SIZE[self.qtype][0]

    @property
    def nbytes(self) -> int:
        return BLOCK_SIZE[self.qtype][1]

    def layout(self, rows: int, level: int):
        """The id of this type's interleaved layout when its kernel runs on this host at level
        and `rows` fit it (a multiple of 8); else None (the data stays as it is)."""
        if self.repack is None or rows % 8 or block_type(self.repack[0]).kernel(level) is None:
            return None
        return self.repack[0]

    def repacked(self, data, level: int):
        """(layout id, data repacked into it) for layout(rows, level); None where there is none."""
        layout = self.layout(data.shape[0], level)
        return None if layout is None else (layout, self.repack[1](data))

    def kernel(self, level: int):
        """The fastest tile kernel of a level <= level that this host runs, or None (portable).
        Never returns one whose instructions the host lacks: compiling it would abort."""
        for lv in sorted(self.simd, reverse=True):
            if lv <= level and isa_supported(lv):
                return self.simd[lv]
        return None


BLOCKS: dict = {}
SLOTS: list = []  # the registered type ids in order: bit i of a type mask is SLOTS[i]


def register(bt: BlockType):
    if int(bt.qtype) not in BLOCKS:
        SLOTS.append(int(bt.qtype))
    if len(SLOTS) > 62:
        raise ValueError("type masks hold at most 62 block types")
    BLOCKS[int(bt.qtype)] = bt


def slot_type(i: int) -> int:
    return SLOTS[i]


def decodable(qtype) -> bool:
    """Whether rows of qtype can be decoded (a GGUF weight type pyllm reads)."""
    bt = BLOCKS.get(int(qtype))
    return bt is not None and bt.decode is not None


def block_type(qtype) -> BlockType:
    """The table entry of qtype; ValueError when no kernels exist for it."""
    bt = BLOCKS.get(int(qtype))
    if bt is None:
        try:
            name = GGMLType(int(qtype)).name
        except ValueError:
            name = str(int(qtype))
        raise ValueError(f"no kernels for block type {name}")
    return bt


def act_forms(qtypes) -> int:
    """Bit mask of the activation forms (1 << ACT_*) that products with these weight types read."""
    mask = 0
    for q in qtypes:
        mask |= 1 << block_type(q).act
    return mask


def type_mask(qtypes) -> int:
    """Bit mask of types (bit i: SLOTS[i]): the MASK argument of dispatch.mm_any."""
    mask = 0
    for q in qtypes:
        block_type(q)
        mask |= 1 << SLOTS.index(int(q))
    return mask


def _register_all():
    from pyllm.kernels import dots_avx2 as x

    T, q, d = GGMLType, quants, dots
    # type, its decoder, the activation it meets, portable dot, SIMD tile kernels, quantizer
    for bt in [
        BlockType(T.F32, q.decode_f32, ACT_F32, d.dot_f32, {AVX2: x.mm_f32}, quantize.row_f32),
        BlockType(T.F16, q.decode_f16, ACT_F32, d.dot_f16, {AVX2: x.mm_f16}, quantize.row_f16),
        BlockType(T.BF16, q.decode_bf16, ACT_F32, d.dot_bf16, {AVX2: x.mm_bf16}, quantize.row_bf16),
        BlockType(T.Q4_0, q.decode_q4_0, ACT_Q8_0, d.dot_q4_0, {AVX2: x.mm_q4_0, AVX512VNNI: x.mm_q4_0_vnni},
                  quantize.row_q4_0, repack=(Q4_0X8, x.repack_q4_0x8)),
        BlockType(T.Q4_1, q.decode_q4_1, ACT_Q8_1, d.dot_q4_1, {AVX2: x.mm_q4_1, AVX512VNNI: x.mm_q4_1_vnni},
                  quantize.row_q4_1, repack=(Q4_1X8, x.repack_q4_1x8)),
        BlockType(T.Q5_0, q.decode_q5_0, ACT_Q8_0, d.dot_q5_0, {AVX2: x.mm_q5_0, AVX512VNNI: x.mm_q5_0_vnni},
                  quantize.row_q5_0, repack=(Q5_0X8, x.repack_q5_0x8)),
        BlockType(T.Q5_1, q.decode_q5_1, ACT_Q8_1, d.dot_q5_1, {AVX2: x.mm_q5_1, AVX512VNNI: x.mm_q5_1_vnni},
                  quantize.row_q5_1, repack=(Q5_1X8, x.repack_q5_1x8)),
        BlockType(T.Q8_0, q.decode_q8_0, ACT_Q8_0, d.dot_q8_0, {AVX2: x.mm_q8_0, AVX512VNNI: x.mm_q8_0_vnni},
                  quantize.row_q8_0, repack=(Q8_0X8, x.repack_q8_0x8)),
        BlockType(T.Q2_K, q.decode_q2_k, ACT_Q8_K, d.dot_q2_k, {AVX2: x.mm_q2_k}, quantize.row_q2_k),
        BlockType(T.Q3_K, q.decode_q3_k, ACT_Q8_K, d.dot_q3_k, {AVX2: x.mm_q3_k}, quantize.row_q3_k),
        BlockType(T.Q4_K, q.decode_q4_k, ACT_Q8_K, d.dot_q4_k, {AVX2: x.mm_q4_k}, quantize.row_q4_k,
                  repack=(Q4_KX8, x.repack_q4_kx8)),
        BlockType(T.Q5_K, q.decode_q5_k, ACT_Q8_K, d.dot_q5_k, {AVX2: x.mm_q5_k}, quantize.row_q5_k),
        BlockType(T.Q6_K, q.decode_q6_k, ACT_Q8_K, d.dot_q6_k, {AVX2: x.mm_q6_k}, quantize.row_q6_k,
                  repack=(Q6_KX8, x.repack_q6_kx8)),
        # Q8_K is an activation format: quantizable (llama.cpp's reference), never a weight here.
        BlockType(T.Q8_K, None, ACT_Q8_K, None, {}, quantize.row_q8_k),
        # interleaved layouts: only SIMD kernels, so only made where those run (repacked())
        BlockType(Q4_0X8, None, ACT_Q8_0, None, {AVX2: x.mm_q4_0x8}, label="Q4_0x8"),
        BlockType(Q4_1X8, None, ACT_Q8_1, None, {AVX2: x.mm_q4_1x8}, label="Q4_1x8"),
        BlockType(Q8_0X8, None, ACT_Q8_0, None, {AVX2: x.mm_q8_0x8, AVX512VNNI: x.mm_q8_0x8_vnni}, label="Q8_0x8"),
        BlockType(Q5_0X8, None, ACT_Q8_0, None, {AVX2: x.mm_q5_0x8}, label="Q5_0x8"),
        BlockType(Q5_1X8, None, ACT_Q8_1, None, {AVX2: x.mm_q5_1x8}, label="Q5_1x8"),
        BlockType(NF4X8, None, ACT_Q8_0, None, {AVX2: x.mm_nf4x8}, label="NF4x8"),
        BlockType(Q4_KX8, None, ACT_Q8_K, None, {AVX2: x.mm_q4_kx8}, label="Q4_Kx8"),
        BlockType(Q6_KX8, None, ACT_Q8_K, None, {AVX2: x.mm_q6_kx8}, label="Q6_Kx8"),
    ]:
        register(bt)
    # pyllm's low-bit float types and ggml's MXFP4 (kernels/lowbit.py): NF4 against Q8_0 in fixed
    # point (dots.dot_nf4), the others with float activations
    register(BlockType(T.NF4, lowbit.decode_nf4, ACT_Q8_0, d.dot_nf4, {AVX2: x.mm_nf4}, lowbit.row_nf4,
                       repack=(NF4X8, x.repack_nf4x8), check=lowbit.check_storable))
    for lt in lowbit.TYPES.values():
        if lt.qtype != T.NF4:
            register(BlockType(lt.qtype, lt.decode, ACT_F32, lt.table_dot, {}, lt.quantize_row,
                               check=lowbit.check_storable))


_register_all()
