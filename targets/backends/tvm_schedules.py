"""Search spaces written for the kernels that dominate CNNs on a CPU, for MetaSchedule to tune.

MetaSchedule's generic space (multi-level tiling of every loop, then random unrolling and
vectorization) holds fast convolutions, but on two cores a build step's budget samples too little
of it: ResNet-18 tuned with 320 trials ran 3.6x slower than onnxruntime, its 3x3 convolutions at a
fifth of what this CPU does. The space here is the structure of a direct convolution known to be
fast on SIMD CPUs (the output channels in one vector register, a row of outputs in a register
block, the reduction over input channels and the kernel window around them, the weights stored
in the order the loop reads them); only its tile sizes are sampled, so a few dozen trials per
convolution find most of what it holds. Written here: TVM 0.27 has no such CPU template for Relax
(its x86 TOPI schedules were TE schedules and are gone, dlight's CPU rules schedule no
convolution).

    for f_outer, y in parallel:                           # output channel blocks x output rows
      for x_outer:                                        # row blocks of `x_inner` outputs
        acc[x_inner][f_middle][lanes] = 0                 # registers
        for c_outer, ky, kx, c_inner:                     # the reduction
          for f_middle, x_inner: acc += input[c, y+ky, x+kx] * weights[f, c, ky, kx][lanes]
        output[...] = epilogue(acc)                       # bias, residual, activation, fused

Sampled: f_middle (vectors of output channels per block), x_inner (outputs per row block),
c_inner (input channels per reduction step). `conv2d_nchw_space` applies to a fused function whose
one reduction is a TOPI `conv2d_nchw` (groups 1) with output channels a multiple of the vector
width, in float32 or (with VNNI) u8 x s8 -> s32; `conv_kind` says whether and how it does, and
other functions keep MetaSchedule's generic space.
"""

from __future__ import annotations

CONV_BLOCK = "conv2d_nchw"


def vector_lanes(target, dtype_bits: int = 32) -> int | None:
    """Elements of `dtype_bits` in one SIMD register of the TVM target; None where unknown."""
    attrs = target.attrs
    mtriple = str(attrs.get("mtriple", ""))
    if mtriple.startswith("aarch64"):
        return 128 // dtype_bits
    mcpu = str(attrs.get("mcpu", ""))
    mattr = [str(a) for a in attrs.get("mattr", [])]
    if mcpu == "x86-64-v4" or "+avx512f" in mattr or mcpu in ("skylake-avx512", "cascadelake", "icelake-server", "sapphirerapids", "znver4", "znver5"):
        return 512 // dtype_bits
    if mcpu.startswith("x86-64-v3") or "+avx2" in mattr or mcpu in ("haswell", "skylake", "znver2", "znver3"):
        return 256 // dtype_bits
    return None


def _reduction_kinds(sch, block) -> str:
    from tvm import tirx

    return "".join("R" if int(iv.iter_type) == tirx.IterVar.CommReduce else "S" for iv in sch.get(block).iter_vars)


def conv_kind(mod, target) -> str | None:
    """"float32" or "int8" (u8 x s8 -> s32 on VNNI) where `conv2d_nchw_space` schedules this
    task's function for the target; None where it keeps MetaSchedule's generic space."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if "R" in _reduction_kinds(sch, b)]
    if len(reductions) != 1 or sch.get(reductions[0]).name_hint != CONV_BLOCK or _reduction_kinds(sch, reductions[0]) != "SSSSRRR":
        return None
    conv = reductions[0]
    out = sch.get(conv).writes[0].source
    data, weights = (r.source for r in sch.get(conv).reads[:2])
    kind = None
    if str(out.dtype) == "float32" and str(data.dtype) == "float32" and str(weights.dtype) == "float32":
        kind = "float32"
    elif (str(out.dtype), str(data.dtype), str(weights.dtype)) == ("int32", "uint8", "int8") and _has_vnni(target) \
            and int(data.shape[1]) % INT8_GROUP == 0:
        kind = "int8"
    lanes = vector_lanes(target, 32)
    if kind is None or lanes is None or len(out.shape) != 4 or int(out.shape[1]) % lanes:
        return None
    if _epilogue(sch, conv) is None:
        return None
    try:  # the space must apply to this function: tried once here, not in every search round
        conv2d_nchw_space(s_tir.Schedule(mod), lanes, kind)
    except Exception:  # noqa: BLE001 - any schedule error means the generic space
        return None
    return kind


def _epilogue(sch, conv) -> list | None:
    """The blocks after the convolution, in order, each reading the one before (a chain the space
    inlines into its last block); None where a block has several readers."""
    chain, block = [], conv
    while consumers := sch.get_consumers(block):
        if len(consumers) != 1:
            return None
        block = consumers[0]
        chain.append(block)
    return chain


def _has_vnni(target) -> bool:
    return "+avx512vnni" in [str(a) for a in target.attrs.get("mattr", [])] and vector_lanes(target, 32) == 16


# VNNI's vpdpbusd sums 4 adjacent u8 x s8 products into each int32 lane.
INT8_GROUP = 4
INPUT_CHANNEL_BLOCK = 16


def conv2d_nchw_space(sch, lanes: int, kind: str = "float32"):
    """Schedules the conv2d_nchw function in `sch` (see the module doc); returns sch."""
    conv = sch.get_sblock(CONV_BLOCK)
    epilogue = _epilogue(sch, conv)
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    # What else the epilogue reads (a residual's dequantize) is computed inside it, element by element.
    if epilogue:
        for producer in sch.get_producers(epilogue[-1]):
            if not sch.get(producer).same_as(sch.get(conv)):
                sch.compute_inline(producer)
    group = INT8_GROUP if kind == "int8" else 1
    channels = int(sch.get(conv).reads[0].source.shape[1])
    # The input copy (the padding) stores a block of channels of each pixel together: the
    # reduction then reads neighbouring addresses, not one plane per channel (cache sets, TLB),
    # and in integers each 4 channels form vpdpbusd's operand.
    channel_block = group if group > 1 else INPUT_CHANNEL_BLOCK if channels % INPUT_CHANNEL_BLOCK == 0 else 1
    producers = sch.get_producers(conv)
    if channel_block > 1 and (group > 1 or producers):
        pad = producers[0] if producers else sch.cache_read(conv, 0, "global")
        sch.transform_layout(pad, ("write", 0), lambda b, c, h, w: (b, c // channel_block, h, w, c % channel_block))
    for producer in sch.get_producers(conv):  # the padding copy, computed on its own
        loops = sch.get_loops(producer)
        if len(loops) >= 3:
            sch.parallel(sch.fuse(*loops[:2]))
            sch.vectorize(loops[-1])
    _prepack_weights(sch, conv, lanes, group)
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    f_outer, f_lanes = sch.split(f, [None, lanes])
    f_outer, f_middle = sch.split(f_outer, sch.sample_perfect_tile(f_outer, n=2, max_innermost_factor=4))
    x_outer, x_inner = sch.split(x, sch.sample_perfect_tile(x, n=2, max_innermost_factor=16))
    rc, c_group = sch.split(rc, [None, group])
    c_outer, c_inner = sch.split(rc, sch.sample_perfect_tile(rc, n=2, max_innermost_factor=32 // group))
    sch.reorder(n, f_outer, y, x_outer, c_outer, ry, rx, c_inner, f_middle, x_inner, f_lanes, c_group)
    sch.parallel(sch.fuse(n, f_outer, y))
    # The accumulators live in registers: a buffer local to the row block, output channels
    # innermost so that each vector of them is contiguous (the VNNI intrinsic's accumulator is
    # declared global; LLVM keeps the small allocation in registers either way).
    scope = "global" if group > 1 else "local"
    if epilogue:
        sch.set_scope(conv, 0, scope)
        sch.transform_layout(conv, ("write", 0), lambda b, c, h, w: (b, h, w, c))
        sch.reverse_compute_at(epilogue[-1], x_outer)
    else:
        write = sch.cache_write(conv, 0, scope)
        sch.transform_layout(conv, ("write", 0), lambda b, c, h, w: (b, h, w, c))
        sch.reverse_compute_at(write, x_outer)
    sch.unroll(x_inner)
    sch.unroll(f_middle)
    sch.unroll(rx)
    if group == 1:
        sch.vectorize(f_lanes)
    init = sch.decompose_reduction(conv, c_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    if group > 1:
        sch.tensorize(f_lanes, register_vnni_intrinsic())
    return sch


LAYOUT_REWRITE = "meta_schedule.layout_rewrite_preproc"
VNNI_INTRINSIC = "graphopt_dot_16x4_vnni"


def register_vnni_intrinsic() -> str:
    """Registers (once) and names a 16 x 4 u8 x s8 -> s32 dot product on vpdpbusd. TVM 0.27 has
    one (dot_16x4_vnni), but it calls the LLVM intrinsic with <16 x i32> operands, which LLVM 22
    (the wheel's) declares <64 x i8>: its code fails LLVM's verifier."""
    from tvm import s_tir
    from tvm.script import tirx as T

    try:
        s_tir.TensorIntrin.get(VNNI_INTRINSIC)
        return VNNI_INTRINSIC
    except Exception:  # noqa: BLE001 - TVM raises a plain error for an unknown intrinsic
        pass

    @T.prim_func(s_tir=True)
    def description(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
                    c: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def implementation(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
                       c: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            a_word = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), c.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_word, 16), dtype="int8x64"), b.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    s_tir.TensorIntrin.register(VNNI_INTRINSIC, description, implementation)
    return VNNI_INTRINSIC


def _prepack_weights(sch, conv, lanes: int, group: int) -> None:
    """Reads the constant weights through a copy in the order the loops read them, [output channel
    block, input channel block, ky, kx, lanes, group] (OIHW16o or OIHW16o4i), marked as
    MetaSchedule's layout rewrite: the build splits it off and folds it into the constant
    (tvm.compile_model), and a tuning measurement leaves it out. Fixed, not the sampled tiles'
    order, so that it stays right when the search mutates them."""
    weights = sch.cache_read(conv, 1, "global")
    sch.annotate(weights, LAYOUT_REWRITE, True)
    sch.transform_layout(weights, ("write", 0), lambda o, i, h, w: (o // lanes, i // group, h, w, o % lanes, i % group))


def space_for(mod, target):
    """A MetaSchedule space generator for the task, or None for the generic space."""
    kind = conv_kind(mod, target)
    if kind is None:
        return None
    import tvm.s_tir.meta_schedule as ms

    lanes = vector_lanes(target)
    postprocs = [ms.postproc.DisallowDynamicLoop(), ms.postproc.RewriteParallelVectorizeUnroll(), ms.postproc.RewriteReductionBlock()]
    return ms.space_generator.ScheduleFn(lambda sch: conv2d_nchw_space(sch, lanes, kind), sch_rules=[], postprocs=postprocs,
                                         mutator_probs={ms.mutator.MutateTileSize(): 1.0})
