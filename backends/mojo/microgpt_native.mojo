# The `mojo` backend's compute: the spec (SPEC.md) on contiguous buffers, as a Python extension
# module built by backends/mojo_backend.py (`mojo build --emit shared-lib`).
#
# `NativeModel[dtype]` (bound to Python as NativeModel32 and NativeModel64) owns every buffer
# between steps: parameters, gradients and Adam moments as flat arrays in the spec's draw order
# (the layout of backends/numpy_backend.py's flat buffer), and the activations of one sequence
# (block_size rows), which double as the key/value cache when sampling. One `train_step` call
# runs the forward pass position by position, the hand-derived backward pass of
# numpy_backend.NumpyBackend._backward, and Adam, and returns the loss.
#
# Shapes: T positions (<= S = block_size), C = n_embd, H heads, D = head_dim, F = 4C, V = vocab.
# Weights are [out, in] row-major, so the forward matvec is a dot product per output row and
# both backward products (weight and input gradients) run along contiguous rows: SIMD along
# `in`, with four independent accumulators so that the FMA latency is hidden.

from std.collections import Array
from std.math import exp, iota, log, sqrt
from std.os import abort
from std.python import Python, PythonObject
from std.python.bindings import PythonModuleBuilder
from std.sys import llvm_intrinsic, simd_width_of
from std.time import perf_counter_ns

comptime RMS_EPS = 1e-5
# Timing points inside the fast step (profile()'s breakdown); off in the build that is measured.
comptime PROFILE_PHASES = False


# ---- raw buffer views ---------------------------------------------------------------------------
@fieldwise_init
struct Buf[dtype: DType](ImplicitlyCopyable):
    """A view into a buffer owned by a NativeModel List: indexing and SIMD load/store."""

    var ptr: Pointer[Scalar[Self.dtype], MutUntrackedOrigin]

    @always_inline
    def __getitem__(self, i: Int) -> Scalar[Self.dtype]:
        return self.ptr[unsafe_offset=i]

    @always_inline
    def __setitem__(self, i: Int, value: Scalar[Self.dtype]):
        self.ptr[unsafe_offset=i] = value

    @always_inline
    def load[width: Int](self, i: Int) -> SIMD[Self.dtype, width]:
        return self.ptr.unsafe_load[width=width](i)

    @always_inline
    def store[width: Int](self, i: Int, value: SIMD[Self.dtype, width]):
        self.ptr.unsafe_store(i, value)

    @always_inline
    def at(self, offset: Int) -> Self:
        return Self(self.ptr.unsafe_offset(offset))


@always_inline
def view[dtype: DType](mut values: List[Scalar[dtype]]) -> Buf[dtype]:
    return Buf[dtype](values.unsafe_ptr().unsafe_origin_cast[MutUntrackedOrigin]())


# ---- Adam's square root and division without the divider ---------------------------------------
# vsqrt and vdiv of 512-bit vectors issue one every 6 to 16 cycles on the shared divider, and
# Adam needs one of each per element: that was most of a step. Instead: the 14-bit hardware
# estimates (vrsqrt14, vrcp14) refined by Newton steps on the FMA units (see adam_span).
@always_inline
def _rsqrt14[dt: DType, w: Int](x: SIMD[dt, w]) -> SIMD[dt, w]:
    comptime if dt == DType.float32 and w == 16:
        return rebind[SIMD[dt, w]](
            llvm_intrinsic["llvm.x86.avx512.rsqrt14.ps.512", SIMD[DType.float32, 16]](
                rebind[SIMD[DType.float32, 16]](x), SIMD[DType.float32, 16](0), UInt16(0xFFFF)
            )
        )
    elif dt == DType.float64 and w == 8:
        return rebind[SIMD[dt, w]](
            llvm_intrinsic["llvm.x86.avx512.rsqrt14.pd.512", SIMD[DType.float64, 8]](
                rebind[SIMD[DType.float64, 8]](x), SIMD[DType.float64, 8](0), UInt8(0xFF)
            )
        )
    else:
        return 1 / sqrt(x)


@always_inline
def _rcp14[dt: DType, w: Int](x: SIMD[dt, w]) -> SIMD[dt, w]:
    comptime if dt == DType.float32 and w == 16:
        return rebind[SIMD[dt, w]](
            llvm_intrinsic["llvm.x86.avx512.rcp14.ps.512", SIMD[DType.float32, 16]](
                rebind[SIMD[DType.float32, 16]](x), SIMD[DType.float32, 16](0), UInt16(0xFFFF)
            )
        )
    elif dt == DType.float64 and w == 8:
        return rebind[SIMD[dt, w]](
            llvm_intrinsic["llvm.x86.avx512.rcp14.pd.512", SIMD[DType.float64, 8]](
                rebind[SIMD[DType.float64, 8]](x), SIMD[DType.float64, 8](0), UInt8(0xFF)
            )
        )
    else:
        return 1 / x


# ---- vector kernels (n is a runtime length; SIMD chunks, then a scalar tail) --------------------
@always_inline
def dot[dtype: DType](a: Buf[dtype], b: Buf[dtype], n: Int) -> Scalar[dtype]:
    comptime W = simd_width_of[dtype]()
    var acc0 = SIMD[dtype, W](0)
    var acc1 = SIMD[dtype, W](0)
    var i = 0
    while i + 2 * W <= n:
        acc0 += a.load[W](i) * b.load[W](i)
        acc1 += a.load[W](i + W) * b.load[W](i + W)
        i += 2 * W
    if i + W <= n:
        acc0 += a.load[W](i) * b.load[W](i)
        i += W
    var total = (acc0 + acc1).reduce_add()
    while i < n:
        total += a[i] * b[i]
        i += 1
    return total


@always_inline
def axpy[dtype: DType](y: Buf[dtype], alpha: Scalar[dtype], x: Buf[dtype], n: Int):
    """Computes y += alpha * x."""
    comptime W = simd_width_of[dtype]()
    var i = 0
    while i + W <= n:
        y.store[W](i, y.load[W](i) + alpha * x.load[W](i))
        i += W
    while i < n:
        y[i] += alpha * x[i]
        i += 1


@always_inline
def add_into[dtype: DType](y: Buf[dtype], a: Buf[dtype], b: Buf[dtype], n: Int):
    """Computes y = a + b (y may alias a or b)."""
    comptime W = simd_width_of[dtype]()
    var i = 0
    while i + W <= n:
        y.store[W](i, a.load[W](i) + b.load[W](i))
        i += W
    while i < n:
        y[i] = a[i] + b[i]
        i += 1


@always_inline
def scale_into[dtype: DType](y: Buf[dtype], x: Buf[dtype], s: Scalar[dtype], n: Int):
    """Computes y = x * s."""
    comptime W = simd_width_of[dtype]()
    var i = 0
    while i + W <= n:
        y.store[W](i, x.load[W](i) * s)
        i += W
    while i < n:
        y[i] = x[i] * s
        i += 1


@always_inline
def fill[dtype: DType](y: Buf[dtype], value: Scalar[dtype], n: Int):
    comptime W = simd_width_of[dtype]()
    var i = 0
    while i + W <= n:
        y.store[W](i, SIMD[dtype, W](value))
        i += W
    while i < n:
        y[i] = value
        i += 1


@always_inline
def rms_scale[dtype: DType](x: Buf[dtype], n: Int) -> Scalar[dtype] where dtype.is_floating_point():
    """(mean(x*x) + eps) ** -0.5, kept for the backward pass."""
    var mean_square = dot(x, x, n) / Scalar[dtype](n)
    return 1 / sqrt(mean_square + Scalar[dtype](RMS_EPS))


@always_inline
def rmsnorm_backward_acc[
    dtype: DType
](dx: Buf[dtype], x: Buf[dtype], s: Scalar[dtype], dy: Buf[dtype], n: Int):
    """Adds the rmsnorm backward to dx, for y = x * s, s = (mean(x^2) + eps)^-1/2:
    s * dy - s^3 * x * mean(dy * x)."""
    var coefficient = s * s * s * dot(dy, x, n) / Scalar[dtype](n)
    comptime W = simd_width_of[dtype]()
    var i = 0
    while i + W <= n:
        dx.store[W](i, dx.load[W](i) + s * dy.load[W](i) - coefficient * x.load[W](i))
        i += W
    while i < n:
        dx[i] += s * dy[i] - coefficient * x[i]
        i += 1


def softmax_inplace[dtype: DType](x: Buf[dtype], n: Int) where dtype.is_floating_point():
    """Softmax with the maximum subtracted before exp (the spec's order)."""
    var top = x[0]
    for i in range(1, n):
        top = max(top, x[i])
    var total = Scalar[dtype](0)
    for i in range(n):
        var e = exp(x[i] - top)
        x[i] = e
        total += e
    for i in range(n):
        x[i] = x[i] / total


# ---- matrix kernels: W is [n_out, n_in] row-major ---------------------------------------------
def matvec[dtype: DType](y: Buf[dtype], w: Buf[dtype], x: Buf[dtype], n_out: Int, n_in: Int):
    """Computes y[o] = W[o, :] . x, four output rows at a time (they share the loads of x)."""
    comptime Wd = simd_width_of[dtype]()
    var o = 0
    while o + 4 <= n_out:
        var r0 = w.at(o * n_in)
        var r1 = w.at((o + 1) * n_in)
        var r2 = w.at((o + 2) * n_in)
        var r3 = w.at((o + 3) * n_in)
        var a0 = SIMD[dtype, Wd](0)
        var a1 = SIMD[dtype, Wd](0)
        var a2 = SIMD[dtype, Wd](0)
        var a3 = SIMD[dtype, Wd](0)
        var i = 0
        while i + Wd <= n_in:
            var xv = x.load[Wd](i)
            a0 += r0.load[Wd](i) * xv
            a1 += r1.load[Wd](i) * xv
            a2 += r2.load[Wd](i) * xv
            a3 += r3.load[Wd](i) * xv
            i += Wd
        var s0 = a0.reduce_add()
        var s1 = a1.reduce_add()
        var s2 = a2.reduce_add()
        var s3 = a3.reduce_add()
        while i < n_in:
            s0 += r0[i] * x[i]
            s1 += r1[i] * x[i]
            s2 += r2[i] * x[i]
            s3 += r3[i] * x[i]
            i += 1
        y[o] = s0
        y[o + 1] = s1
        y[o + 2] = s2
        y[o + 3] = s3
        o += 4
    while o < n_out:
        y[o] = dot(w.at(o * n_in), x, n_in)
        o += 1


def weight_grad[
    dtype: DType
](g: Buf[dtype], dy: Buf[dtype], x: Buf[dtype], rows: Int, n_out: Int, n_in: Int):
    """Accumulates g[o, :] += sum_t dy[t, o] * x[t, :] over `rows` positions (dy [rows, n_out],
    x [rows, n_in]); four gradient rows at a time, which share the loads of x."""
    comptime Wd = simd_width_of[dtype]()
    var o = 0
    while o + 4 <= n_out:
        var g0 = g.at(o * n_in)
        var g1 = g.at((o + 1) * n_in)
        var g2 = g.at((o + 2) * n_in)
        var g3 = g.at((o + 3) * n_in)
        var i = 0
        while i + Wd <= n_in:
            var a0 = g0.load[Wd](i)
            var a1 = g1.load[Wd](i)
            var a2 = g2.load[Wd](i)
            var a3 = g3.load[Wd](i)
            for t in range(rows):
                var xv = x.load[Wd](t * n_in + i)
                var d = dy.at(t * n_out + o)
                a0 += d[0] * xv
                a1 += d[1] * xv
                a2 += d[2] * xv
                a3 += d[3] * xv
            g0.store[Wd](i, a0)
            g1.store[Wd](i, a1)
            g2.store[Wd](i, a2)
            g3.store[Wd](i, a3)
            i += Wd
        while i < n_in:
            for t in range(rows):
                var xs = x[t * n_in + i]
                var d = dy.at(t * n_out + o)
                g0[i] += d[0] * xs
                g1[i] += d[1] * xs
                g2[i] += d[2] * xs
                g3[i] += d[3] * xs
            i += 1
        o += 4
    while o < n_out:
        for t in range(rows):
            axpy(g.at(o * n_in), dy[t * n_out + o], x.at(t * n_in), n_in)
        o += 1


def input_grad[
    dtype: DType
](
    dx: Buf[dtype],
    dy: Buf[dtype],
    w: Buf[dtype],
    rows: Int,
    n_out: Int,
    n_in: Int,
    accumulate: Bool,
):
    """Computes dx[t, :] (+)= sum_o dy[t, o] * W[o, :]; four positions at a time, which share
    the loads of W."""
    comptime Wd = simd_width_of[dtype]()
    if not accumulate:
        fill(dx, Scalar[dtype](0), rows * n_in)
    var t = 0
    while t + 4 <= rows:
        var x0 = dx.at(t * n_in)
        var x1 = dx.at((t + 1) * n_in)
        var x2 = dx.at((t + 2) * n_in)
        var x3 = dx.at((t + 3) * n_in)
        var d0 = dy.at(t * n_out)
        var d1 = dy.at((t + 1) * n_out)
        var d2 = dy.at((t + 2) * n_out)
        var d3 = dy.at((t + 3) * n_out)
        var i = 0
        while i + Wd <= n_in:
            var a0 = x0.load[Wd](i)
            var a1 = x1.load[Wd](i)
            var a2 = x2.load[Wd](i)
            var a3 = x3.load[Wd](i)
            for o in range(n_out):
                var wv = w.load[Wd](o * n_in + i)
                a0 += d0[o] * wv
                a1 += d1[o] * wv
                a2 += d2[o] * wv
                a3 += d3[o] * wv
            x0.store[Wd](i, a0)
            x1.store[Wd](i, a1)
            x2.store[Wd](i, a2)
            x3.store[Wd](i, a3)
            i += Wd
        while i < n_in:
            for o in range(n_out):
                var ws = w[o * n_in + i]
                x0[i] += d0[o] * ws
                x1[i] += d1[o] * ws
                x2[i] += d2[o] * ws
                x3[i] += d3[o] * ws
            i += 1
        t += 4
    while t < rows:
        for o in range(n_out):
            axpy(dx.at(t * n_in), dy[t * n_out + o], w.at(o * n_in), n_in)
        t += 1


# ---- the fast path: n_embd 16, 4 heads of 4, vocab <= 32 (the `tiny` preset) ---------------
# Every width-16 row is one SIMD[dtype, 16] value (one AVX-512 register in float32, two in
# float64). All positions of the batch run through each matrix product together (rows
# concatenated), so that products are [N, in] x [in, out] with several independent
# accumulators; only attention runs per sequence. Forward products broadcast an input scalar
# against a row of the transposed weight (kept in `wt`, refreshed after every update);
# backward products broadcast a gradient scalar against a row of the weight itself (the flat
# buffer). Attention keeps the 4 heads side by side in one 16-lane row: q * k summed within
# each group of 4 lanes gives every head's score, replicated over its 4 lanes, so softmax and
# the weighted sums are plain vertical SIMD.
comptime FC = 16  # n_embd
comptime FF = 64  # MLP width
comptime FQ = 48  # q, k, v side by side
comptime FV = 32  # vocab, padded


@always_inline
def seg4_sum[dt: DType](p: SIMD[dt, 16]) -> SIMD[dt, 16]:
    """Sum within each group of 4 lanes, replicated over the group."""
    var s = p + p.shuffle[1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14]()
    return s + s.shuffle[2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13]()


@always_inline
def rms16[dt: DType](x: SIMD[dt, 16]) -> Scalar[dt] where dt.is_floating_point():
    var mean_square = (x * x).reduce_add() / Scalar[dt](FC)
    return 1 / sqrt(mean_square + Scalar[dt](RMS_EPS))


@always_inline
def rms16_backward[
    dt: DType
](x: SIMD[dt, 16], s: Scalar[dt], dy: SIMD[dt, 16]) -> SIMD[dt, 16]:
    """Returns s * dy - s^3 * x * mean(dy * x): the rmsnorm backward of y = x * s."""
    var coefficient = s * s * s * (dy * x).reduce_add() / Scalar[dt](FC)
    return s * dy - coefficient * x


@always_inline
def mm_forward_residual[
    dt: DType, IN: Int, OUT: Int
](y: Buf[dt], x: Buf[dt], wt: Buf[dt], res: Buf[dt], n: Int):
    """Computes y[t, :OUT] = x[t, :IN] @ wt[IN, OUT] + res[t, :OUT] for t < n rounded up to 4
    (the buffers have room; rows past n hold finite leftovers that nothing reads)."""
    var t = 0
    while t < n:
        var x0 = x.at(t * IN)
        var x1 = x.at((t + 1) * IN)
        var x2 = x.at((t + 2) * IN)
        var x3 = x.at((t + 3) * IN)
        comptime for j in range(OUT // 16):
            var a0 = SIMD[dt, 16](0)
            var a1 = SIMD[dt, 16](0)
            var a2 = SIMD[dt, 16](0)
            var a3 = SIMD[dt, 16](0)
            comptime for i in range(IN):
                var w = wt.load[16](i * OUT + j * 16)
                a0 += x0[i] * w
                a1 += x1[i] * w
                a2 += x2[i] * w
                a3 += x3[i] * w
            a0 += res.load[16](t * OUT + j * 16)
            a1 += res.load[16]((t + 1) * OUT + j * 16)
            a2 += res.load[16]((t + 2) * OUT + j * 16)
            a3 += res.load[16]((t + 3) * OUT + j * 16)
            y.store[16](t * OUT + j * 16, a0)
            y.store[16]((t + 1) * OUT + j * 16, a1)
            y.store[16]((t + 2) * OUT + j * 16, a2)
            y.store[16]((t + 3) * OUT + j * 16, a3)
        t += 4


@always_inline
def mm_forward_wide[
    dt: DType, IN: Int, OUT: Int, RELU: Bool
](y: Buf[dt], x: Buf[dt], wt: Buf[dt], n: Int):
    """Like mm_forward_residual without the residual, for OUT of several 16-lane blocks: a few
    positions at a time with every block of the row in registers, so each x[t, i] is read
    once rather than once per block (the same sums in the same order). With RELU,
    y = max(x @ wt, 0), applied in the registers rather than in a pass of its own (with the
    input-gradient kernel's relu, float32 steps became about 6% faster; float64 showed no
    measurable change)."""
    comptime BLOCKS = OUT // 16
    comptime P = 4 if dt == DType.float32 else 2  # P * BLOCKS accumulators fit the registers
    var t = 0
    while t < n:
        var acc = Array[SIMD[dt, 16], P * BLOCKS](fill=SIMD[dt, 16](0))
        comptime for i in range(IN):
            comptime for p in range(P):
                var xi = x[(t + p) * IN + i]
                comptime for j in range(BLOCKS):
                    acc[p * BLOCKS + j] += xi * wt.load[16](i * OUT + j * 16)
        comptime for p in range(P):
            comptime for j in range(BLOCKS):
                var out = acc[p * BLOCKS + j]
                comptime if RELU:
                    out = max(out, SIMD[dt, 16](0))
                y.store[16]((t + p) * OUT + j * 16, out)
        t += P


@always_inline
def mm_weight_grad[
    dt: DType, IN: Int, DS: Int
](g: Buf[dt], dy: Buf[dt], x: Buf[dt], n: Int, rows: Int):
    """Computes g[o, :IN] = sum_{t < n} dy[t, o] * x[t, :IN] for o < rows (dy row stride DS)."""
    var o = 0
    while o + 4 <= rows:
        comptime for c in range(IN // 16):
            var a0 = SIMD[dt, 16](0)
            var a1 = SIMD[dt, 16](0)
            var a2 = SIMD[dt, 16](0)
            var a3 = SIMD[dt, 16](0)
            for t in range(n):
                var xv = x.load[16](t * IN + c * 16)
                var d = dy.at(t * DS + o)
                a0 += d[0] * xv
                a1 += d[1] * xv
                a2 += d[2] * xv
                a3 += d[3] * xv
            g.store[16](o * IN + c * 16, a0)
            g.store[16]((o + 1) * IN + c * 16, a1)
            g.store[16]((o + 2) * IN + c * 16, a2)
            g.store[16]((o + 3) * IN + c * 16, a3)
        o += 4
    while o < rows:
        comptime for c in range(IN // 16):
            var a0 = SIMD[dt, 16](0)
            for t in range(n):
                a0 += dy[t * DS + o] * x.load[16](t * IN + c * 16)
            g.store[16](o * IN + c * 16, a0)
        o += 1


@always_inline
def mm_input_grad[
    dt: DType, IN: Int, DS: Int
](dx: Buf[dt], dy: Buf[dt], w: Buf[dt], n: Int, rows: Int):
    """Computes dx[t, :IN] = sum_{o < rows} dy[t, o] * w[o, :IN] for t < n rounded up to 4."""
    input_grad_kernel[dt, IN, DS, False](dx, dy, w, n, rows, dx)


@always_inline
def mm_input_grad_relu[
    dt: DType, IN: Int, DS: Int
](dx: Buf[dt], dy: Buf[dt], w: Buf[dt], n: Int, rows: Int, relu_out: Buf[dt]):
    """mm_input_grad through a relu: dx is 0 wherever relu_out[t, :IN] is not > 0, applied in
    the registers instead of a pass of its own over dx."""
    input_grad_kernel[dt, IN, DS, True](dx, dy, w, n, rows, relu_out)


@always_inline
def input_grad_kernel[
    dt: DType, IN: Int, DS: Int, RELU: Bool
](dx: Buf[dt], dy: Buf[dt], w: Buf[dt], n: Int, rows: Int, relu_out: Buf[dt]):
    var t = 0
    while t < n:
        var d0 = dy.at(t * DS)
        var d1 = dy.at((t + 1) * DS)
        var d2 = dy.at((t + 2) * DS)
        var d3 = dy.at((t + 3) * DS)
        comptime for c in range(IN // 16):
            var a0 = SIMD[dt, 16](0)
            var a1 = SIMD[dt, 16](0)
            var a2 = SIMD[dt, 16](0)
            var a3 = SIMD[dt, 16](0)
            for o in range(rows):
                var wv = w.load[16](o * IN + c * 16)
                a0 += d0[o] * wv
                a1 += d1[o] * wv
                a2 += d2[o] * wv
                a3 += d3[o] * wv
            comptime if RELU:
                comptime zero = SIMD[dt, 16](0)
                a0 = relu_out.load[16](t * IN + c * 16).gt(zero).select(a0, zero)
                a1 = relu_out.load[16]((t + 1) * IN + c * 16).gt(zero).select(a1, zero)
                a2 = relu_out.load[16]((t + 2) * IN + c * 16).gt(zero).select(a2, zero)
                a3 = relu_out.load[16]((t + 3) * IN + c * 16).gt(zero).select(a3, zero)
            dx.store[16](t * IN + c * 16, a0)
            dx.store[16]((t + 1) * IN + c * 16, a1)
            dx.store[16]((t + 2) * IN + c * 16, a2)
            dx.store[16]((t + 3) * IN + c * 16, a3)
        t += 4


@always_inline
def transpose8[dt: DType](dst: Buf[dt], dst_stride: Int, src: Buf[dt], src_stride: Int, rows: Int):
    """Writes dst[c, r] = src[r, c] for an 8 x 8 block (rows from `rows` on read as 0): three
    interleaving rounds of 8-lane vectors (one register each in float64)."""
    var a0 = src.load[8](0 * src_stride) if 0 < rows else SIMD[dt, 8](0)
    var a1 = src.load[8](1 * src_stride) if 1 < rows else SIMD[dt, 8](0)
    var a2 = src.load[8](2 * src_stride) if 2 < rows else SIMD[dt, 8](0)
    var a3 = src.load[8](3 * src_stride) if 3 < rows else SIMD[dt, 8](0)
    var a4 = src.load[8](4 * src_stride) if 4 < rows else SIMD[dt, 8](0)
    var a5 = src.load[8](5 * src_stride) if 5 < rows else SIMD[dt, 8](0)
    var a6 = src.load[8](6 * src_stride) if 6 < rows else SIMD[dt, 8](0)
    var a7 = src.load[8](7 * src_stride) if 7 < rows else SIMD[dt, 8](0)
    var p0_0 = a0.interleave(a4)
    var b0_0 = rebind[SIMD[dt, 8]](p0_0.slice[8, offset=0]())
    var b0_1 = rebind[SIMD[dt, 8]](p0_0.slice[8, offset=8]())
    var p0_1 = a1.interleave(a5)
    var b0_2 = rebind[SIMD[dt, 8]](p0_1.slice[8, offset=0]())
    var b0_3 = rebind[SIMD[dt, 8]](p0_1.slice[8, offset=8]())
    var p0_2 = a2.interleave(a6)
    var b0_4 = rebind[SIMD[dt, 8]](p0_2.slice[8, offset=0]())
    var b0_5 = rebind[SIMD[dt, 8]](p0_2.slice[8, offset=8]())
    var p0_3 = a3.interleave(a7)
    var b0_6 = rebind[SIMD[dt, 8]](p0_3.slice[8, offset=0]())
    var b0_7 = rebind[SIMD[dt, 8]](p0_3.slice[8, offset=8]())
    var p1_0 = b0_0.interleave(b0_4)
    var b1_0 = rebind[SIMD[dt, 8]](p1_0.slice[8, offset=0]())
    var b1_1 = rebind[SIMD[dt, 8]](p1_0.slice[8, offset=8]())
    var p1_1 = b0_1.interleave(b0_5)
    var b1_2 = rebind[SIMD[dt, 8]](p1_1.slice[8, offset=0]())
    var b1_3 = rebind[SIMD[dt, 8]](p1_1.slice[8, offset=8]())
    var p1_2 = b0_2.interleave(b0_6)
    var b1_4 = rebind[SIMD[dt, 8]](p1_2.slice[8, offset=0]())
    var b1_5 = rebind[SIMD[dt, 8]](p1_2.slice[8, offset=8]())
    var p1_3 = b0_3.interleave(b0_7)
    var b1_6 = rebind[SIMD[dt, 8]](p1_3.slice[8, offset=0]())
    var b1_7 = rebind[SIMD[dt, 8]](p1_3.slice[8, offset=8]())
    var p2_0 = b1_0.interleave(b1_4)
    var b2_0 = rebind[SIMD[dt, 8]](p2_0.slice[8, offset=0]())
    var b2_1 = rebind[SIMD[dt, 8]](p2_0.slice[8, offset=8]())
    var p2_1 = b1_1.interleave(b1_5)
    var b2_2 = rebind[SIMD[dt, 8]](p2_1.slice[8, offset=0]())
    var b2_3 = rebind[SIMD[dt, 8]](p2_1.slice[8, offset=8]())
    var p2_2 = b1_2.interleave(b1_6)
    var b2_4 = rebind[SIMD[dt, 8]](p2_2.slice[8, offset=0]())
    var b2_5 = rebind[SIMD[dt, 8]](p2_2.slice[8, offset=8]())
    var p2_3 = b1_3.interleave(b1_7)
    var b2_6 = rebind[SIMD[dt, 8]](p2_3.slice[8, offset=0]())
    var b2_7 = rebind[SIMD[dt, 8]](p2_3.slice[8, offset=8]())
    dst.store[8](0 * dst_stride, b2_0)
    dst.store[8](1 * dst_stride, b2_1)
    dst.store[8](2 * dst_stride, b2_2)
    dst.store[8](3 * dst_stride, b2_3)
    dst.store[8](4 * dst_stride, b2_4)
    dst.store[8](5 * dst_stride, b2_5)
    dst.store[8](6 * dst_stride, b2_6)
    dst.store[8](7 * dst_stride, b2_7)


@always_inline
def transpose16[dt: DType](dst: Buf[dt], dst_stride: Int, src: Buf[dt], src_stride: Int, rows: Int):
    """Writes dst[c, r] = src[r, c] for a 16 x 16 block (source rows from `rows` on read as
    0): four rounds that interleave rows k and k + 8, each rotating the (row, lane) index bits.
    In float64, four 8 x 8 blocks instead (a 16-lane row is two registers there)."""
    comptime if dt == DType.float64:
        comptime for bi in range(2):
            comptime for bj in range(2):
                transpose8(
                    dst.at(bj * 8 * dst_stride + bi * 8),
                    dst_stride,
                    src.at(bi * 8 * src_stride + bj * 8),
                    src_stride,
                    rows - bi * 8,
                )
        return
    var a0 = src.load[16](0 * src_stride) if 0 < rows else SIMD[dt, 16](0)
    var a1 = src.load[16](1 * src_stride) if 1 < rows else SIMD[dt, 16](0)
    var a2 = src.load[16](2 * src_stride) if 2 < rows else SIMD[dt, 16](0)
    var a3 = src.load[16](3 * src_stride) if 3 < rows else SIMD[dt, 16](0)
    var a4 = src.load[16](4 * src_stride) if 4 < rows else SIMD[dt, 16](0)
    var a5 = src.load[16](5 * src_stride) if 5 < rows else SIMD[dt, 16](0)
    var a6 = src.load[16](6 * src_stride) if 6 < rows else SIMD[dt, 16](0)
    var a7 = src.load[16](7 * src_stride) if 7 < rows else SIMD[dt, 16](0)
    var a8 = src.load[16](8 * src_stride) if 8 < rows else SIMD[dt, 16](0)
    var a9 = src.load[16](9 * src_stride) if 9 < rows else SIMD[dt, 16](0)
    var a10 = src.load[16](10 * src_stride) if 10 < rows else SIMD[dt, 16](0)
    var a11 = src.load[16](11 * src_stride) if 11 < rows else SIMD[dt, 16](0)
    var a12 = src.load[16](12 * src_stride) if 12 < rows else SIMD[dt, 16](0)
    var a13 = src.load[16](13 * src_stride) if 13 < rows else SIMD[dt, 16](0)
    var a14 = src.load[16](14 * src_stride) if 14 < rows else SIMD[dt, 16](0)
    var a15 = src.load[16](15 * src_stride) if 15 < rows else SIMD[dt, 16](0)
    var p0_0 = a0.interleave(a8)
    var b0_0 = rebind[SIMD[dt, 16]](p0_0.slice[16, offset=0]())
    var b0_1 = rebind[SIMD[dt, 16]](p0_0.slice[16, offset=16]())
    var p0_1 = a1.interleave(a9)
    var b0_2 = rebind[SIMD[dt, 16]](p0_1.slice[16, offset=0]())
    var b0_3 = rebind[SIMD[dt, 16]](p0_1.slice[16, offset=16]())
    var p0_2 = a2.interleave(a10)
    var b0_4 = rebind[SIMD[dt, 16]](p0_2.slice[16, offset=0]())
    var b0_5 = rebind[SIMD[dt, 16]](p0_2.slice[16, offset=16]())
    var p0_3 = a3.interleave(a11)
    var b0_6 = rebind[SIMD[dt, 16]](p0_3.slice[16, offset=0]())
    var b0_7 = rebind[SIMD[dt, 16]](p0_3.slice[16, offset=16]())
    var p0_4 = a4.interleave(a12)
    var b0_8 = rebind[SIMD[dt, 16]](p0_4.slice[16, offset=0]())
    var b0_9 = rebind[SIMD[dt, 16]](p0_4.slice[16, offset=16]())
    var p0_5 = a5.interleave(a13)
    var b0_10 = rebind[SIMD[dt, 16]](p0_5.slice[16, offset=0]())
    var b0_11 = rebind[SIMD[dt, 16]](p0_5.slice[16, offset=16]())
    var p0_6 = a6.interleave(a14)
    var b0_12 = rebind[SIMD[dt, 16]](p0_6.slice[16, offset=0]())
    var b0_13 = rebind[SIMD[dt, 16]](p0_6.slice[16, offset=16]())
    var p0_7 = a7.interleave(a15)
    var b0_14 = rebind[SIMD[dt, 16]](p0_7.slice[16, offset=0]())
    var b0_15 = rebind[SIMD[dt, 16]](p0_7.slice[16, offset=16]())
    var p1_0 = b0_0.interleave(b0_8)
    var b1_0 = rebind[SIMD[dt, 16]](p1_0.slice[16, offset=0]())
    var b1_1 = rebind[SIMD[dt, 16]](p1_0.slice[16, offset=16]())
    var p1_1 = b0_1.interleave(b0_9)
    var b1_2 = rebind[SIMD[dt, 16]](p1_1.slice[16, offset=0]())
    var b1_3 = rebind[SIMD[dt, 16]](p1_1.slice[16, offset=16]())
    var p1_2 = b0_2.interleave(b0_10)
    var b1_4 = rebind[SIMD[dt, 16]](p1_2.slice[16, offset=0]())
    var b1_5 = rebind[SIMD[dt, 16]](p1_2.slice[16, offset=16]())
    var p1_3 = b0_3.interleave(b0_11)
    var b1_6 = rebind[SIMD[dt, 16]](p1_3.slice[16, offset=0]())
    var b1_7 = rebind[SIMD[dt, 16]](p1_3.slice[16, offset=16]())
    var p1_4 = b0_4.interleave(b0_12)
    var b1_8 = rebind[SIMD[dt, 16]](p1_4.slice[16, offset=0]())
    var b1_9 = rebind[SIMD[dt, 16]](p1_4.slice[16, offset=16]())
    var p1_5 = b0_5.interleave(b0_13)
    var b1_10 = rebind[SIMD[dt, 16]](p1_5.slice[16, offset=0]())
    var b1_11 = rebind[SIMD[dt, 16]](p1_5.slice[16, offset=16]())
    var p1_6 = b0_6.interleave(b0_14)
    var b1_12 = rebind[SIMD[dt, 16]](p1_6.slice[16, offset=0]())
    var b1_13 = rebind[SIMD[dt, 16]](p1_6.slice[16, offset=16]())
    var p1_7 = b0_7.interleave(b0_15)
    var b1_14 = rebind[SIMD[dt, 16]](p1_7.slice[16, offset=0]())
    var b1_15 = rebind[SIMD[dt, 16]](p1_7.slice[16, offset=16]())
    var p2_0 = b1_0.interleave(b1_8)
    var b2_0 = rebind[SIMD[dt, 16]](p2_0.slice[16, offset=0]())
    var b2_1 = rebind[SIMD[dt, 16]](p2_0.slice[16, offset=16]())
    var p2_1 = b1_1.interleave(b1_9)
    var b2_2 = rebind[SIMD[dt, 16]](p2_1.slice[16, offset=0]())
    var b2_3 = rebind[SIMD[dt, 16]](p2_1.slice[16, offset=16]())
    var p2_2 = b1_2.interleave(b1_10)
    var b2_4 = rebind[SIMD[dt, 16]](p2_2.slice[16, offset=0]())
    var b2_5 = rebind[SIMD[dt, 16]](p2_2.slice[16, offset=16]())
    var p2_3 = b1_3.interleave(b1_11)
    var b2_6 = rebind[SIMD[dt, 16]](p2_3.slice[16, offset=0]())
    var b2_7 = rebind[SIMD[dt, 16]](p2_3.slice[16, offset=16]())
    var p2_4 = b1_4.interleave(b1_12)
    var b2_8 = rebind[SIMD[dt, 16]](p2_4.slice[16, offset=0]())
    var b2_9 = rebind[SIMD[dt, 16]](p2_4.slice[16, offset=16]())
    var p2_5 = b1_5.interleave(b1_13)
    var b2_10 = rebind[SIMD[dt, 16]](p2_5.slice[16, offset=0]())
    var b2_11 = rebind[SIMD[dt, 16]](p2_5.slice[16, offset=16]())
    var p2_6 = b1_6.interleave(b1_14)
    var b2_12 = rebind[SIMD[dt, 16]](p2_6.slice[16, offset=0]())
    var b2_13 = rebind[SIMD[dt, 16]](p2_6.slice[16, offset=16]())
    var p2_7 = b1_7.interleave(b1_15)
    var b2_14 = rebind[SIMD[dt, 16]](p2_7.slice[16, offset=0]())
    var b2_15 = rebind[SIMD[dt, 16]](p2_7.slice[16, offset=16]())
    var p3_0 = b2_0.interleave(b2_8)
    var b3_0 = rebind[SIMD[dt, 16]](p3_0.slice[16, offset=0]())
    var b3_1 = rebind[SIMD[dt, 16]](p3_0.slice[16, offset=16]())
    var p3_1 = b2_1.interleave(b2_9)
    var b3_2 = rebind[SIMD[dt, 16]](p3_1.slice[16, offset=0]())
    var b3_3 = rebind[SIMD[dt, 16]](p3_1.slice[16, offset=16]())
    var p3_2 = b2_2.interleave(b2_10)
    var b3_4 = rebind[SIMD[dt, 16]](p3_2.slice[16, offset=0]())
    var b3_5 = rebind[SIMD[dt, 16]](p3_2.slice[16, offset=16]())
    var p3_3 = b2_3.interleave(b2_11)
    var b3_6 = rebind[SIMD[dt, 16]](p3_3.slice[16, offset=0]())
    var b3_7 = rebind[SIMD[dt, 16]](p3_3.slice[16, offset=16]())
    var p3_4 = b2_4.interleave(b2_12)
    var b3_8 = rebind[SIMD[dt, 16]](p3_4.slice[16, offset=0]())
    var b3_9 = rebind[SIMD[dt, 16]](p3_4.slice[16, offset=16]())
    var p3_5 = b2_5.interleave(b2_13)
    var b3_10 = rebind[SIMD[dt, 16]](p3_5.slice[16, offset=0]())
    var b3_11 = rebind[SIMD[dt, 16]](p3_5.slice[16, offset=16]())
    var p3_6 = b2_6.interleave(b2_14)
    var b3_12 = rebind[SIMD[dt, 16]](p3_6.slice[16, offset=0]())
    var b3_13 = rebind[SIMD[dt, 16]](p3_6.slice[16, offset=16]())
    var p3_7 = b2_7.interleave(b2_15)
    var b3_14 = rebind[SIMD[dt, 16]](p3_7.slice[16, offset=0]())
    var b3_15 = rebind[SIMD[dt, 16]](p3_7.slice[16, offset=16]())
    dst.store[16](0 * dst_stride, b3_0)
    dst.store[16](1 * dst_stride, b3_1)
    dst.store[16](2 * dst_stride, b3_2)
    dst.store[16](3 * dst_stride, b3_3)
    dst.store[16](4 * dst_stride, b3_4)
    dst.store[16](5 * dst_stride, b3_5)
    dst.store[16](6 * dst_stride, b3_6)
    dst.store[16](7 * dst_stride, b3_7)
    dst.store[16](8 * dst_stride, b3_8)
    dst.store[16](9 * dst_stride, b3_9)
    dst.store[16](10 * dst_stride, b3_10)
    dst.store[16](11 * dst_stride, b3_11)
    dst.store[16](12 * dst_stride, b3_12)
    dst.store[16](13 * dst_stride, b3_13)
    dst.store[16](14 * dst_stride, b3_14)
    dst.store[16](15 * dst_stride, b3_15)


@always_inline
def transpose_into[dt: DType](dst: Buf[dt], src: Buf[dt], rows: Int, cols: Int, dst_stride: Int):
    """Writes dst[c, r] = src[r, c] (src [rows, cols] row-major, dst rows dst_stride apart)."""
    for r in range(rows):
        for c in range(cols):
            dst[c * dst_stride + r] = src[r * cols + c]


comptime FAST_LAYER = 4 * FC * FC + 2 * FF * FC  # one layer's matrices


# ---- the model --------------------------------------------------------------------------------
struct NativeModel[dtype: DType](Movable, Writable) where dtype.is_floating_point():
    """All state of one backend instance; see the file header for the layout."""

    comptime Scalar = Scalar[Self.dtype]

    # Sizes.
    var vocab: Int
    var n_embd: Int
    var n_head: Int
    var head_dim: Int
    var n_layer: Int
    var block: Int
    var hidden: Int
    var n_params: Int
    var attention_scale: Self.Scalar
    var beta1: Float64
    var beta2: Float64
    var eps: Float64

    # Flat parameter-sized buffers, the spec's draw order.
    var params: List[Self.Scalar]
    var grads: List[Self.Scalar]
    var adam_m: List[Self.Scalar]
    var adam_v: List[Self.Scalar]

    # Activations and backward scratch of one sequence, one buffer; offsets below.
    var acts: List[Self.Scalar]
    var layer_stride: Int
    var off_x_embed: Int  # [S, C] wte[t] + wpe[p] before the first rmsnorm
    var off_embed_scale: Int  # [S]
    var off_x_final: Int  # [S, C] the last layer's output
    var off_logits: Int  # [S, V]
    var off_probs: Int  # [S, V]
    var off_layers: Int  # n_layer blocks of layer_stride, fields at the offsets below
    var f_x_in: Int  # [S, C]
    var f_scale1: Int  # [S]
    var f_xn: Int  # [S, C]
    var f_q: Int  # [S, C]
    var f_k: Int  # [S, C]  (the key cache when sampling)
    var f_v: Int  # [S, C]  (the value cache when sampling)
    var f_att: Int  # [H, S, S] softmax weights, row t holds columns 0..t
    var f_heads: Int  # [S, C]
    var f_x_mid: Int  # [S, C]
    var f_scale2: Int  # [S]
    var f_xn2: Int  # [S, C]
    var f_hidden: Int  # [S, F] before relu
    var f_act: Int  # [S, F] after relu
    var off_dx: Int  # [S, C] backward scratch from here on
    var off_dwide: Int  # [S, F]
    var off_dxn: Int  # [S, C]
    var off_dheads: Int  # [S, C]
    var off_dq: Int  # [S, C]
    var off_dk: Int  # [S, C]
    var off_dv: Int  # [S, C]
    var off_datt: Int  # [S]
    var off_dlogits: Int  # [S, V]

    # Tokens of the current batch: row b at b * (S + 1), n_b predicted positions.
    var tokens: List[Int]
    var lengths: List[Int]
    var cache_length: Int  # positions in the key/value cache when sampling

    # The fast path (n_embd 16, 4 heads, vocab <= 32): transposed weights and the activations
    # of every position of a batch, rows concatenated (offsets set by fast_resize).
    var fast: Bool
    var wt: List[Self.Scalar]
    var fa: List[Self.Scalar]
    var fcap: Int
    var fo_e: Int  # [N, C] wte[t] + wpe[p]
    var fo_s0: Int  # [N]
    var fo_xf: Int  # [N, C] the last layer's output
    var fo_dlog: Int  # [N, 32] logits, then d loss / d logits
    var fo_dx: Int  # [N, C]
    var fo_dxn: Int  # [N, C]
    var fo_dheads: Int  # [N, C]
    var fo_dqkv: Int  # [N, 3C]
    var fo_dact: Int  # [N, F]
    var fo_datt: Int  # [S, C]
    var fo_lse: Int  # [N + 16] softmax sums, then [N + 16] target logits minus the maximum
    var fo_layers: Int
    var fl_xin: Int  # [N, C]
    var fl_s1: Int  # [N]
    var fl_xn: Int  # [N, C]
    var fl_qkv: Int  # [N, 3C]
    var fl_att: Int  # [N, S, C] softmax weights, each head's replicated over its 4 lanes
    var fl_heads: Int  # [N, C]
    var fl_xmid: Int  # [N, C]
    var fl_s2: Int  # [N]
    var fl_xn2: Int  # [N, C]
    var fl_act: Int  # [N, F] after relu (its sign is relu's mask in the backward pass)
    var fl_stride: Int
    var phase_ns: List[Int]  # PROFILE_PHASES: nanoseconds per part of the fast step
    var phase_clock: Int

    def __init__(
        out self,
        vocab: Int,
        n_embd: Int,
        n_head: Int,
        n_layer: Int,
        block: Int,
        beta1: Float64,
        beta2: Float64,
        eps: Float64,
    ) raises:
        if vocab < 1 or n_embd < 1 or n_head < 1 or n_layer < 1 or block < 1:
            raise Error("NativeModel: every size must be >= 1")
        if n_embd % n_head != 0:
            raise Error("NativeModel: n_embd must be divisible by n_head")
        self.vocab = vocab
        self.n_embd = n_embd
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.n_layer = n_layer
        self.block = block
        self.hidden = 4 * n_embd
        var C = n_embd
        var F = 4 * n_embd
        var S = block
        var V = vocab
        var H = n_head
        self.n_params = 2 * V * C + S * C + n_layer * (4 * C * C + 2 * F * C)
        self.attention_scale = Self.Scalar(1.0 / sqrt(Float64(self.head_dim)))
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.params = List[Self.Scalar](length=self.n_params, fill=0)
        self.grads = List[Self.Scalar](length=self.n_params, fill=0)
        self.adam_m = List[Self.Scalar](length=self.n_params, fill=0)
        self.adam_v = List[Self.Scalar](length=self.n_params, fill=0)

        var size = 0
        self.off_x_embed = size
        size += S * C
        self.off_embed_scale = size
        size += S
        self.off_x_final = size
        size += S * C
        self.off_logits = size
        size += S * V
        self.off_probs = size
        size += S * V
        self.off_dx = size
        size += S * C
        self.off_dwide = size
        size += S * F
        self.off_dxn = size
        size += S * C
        self.off_dheads = size
        size += S * C
        self.off_dq = size
        size += S * C
        self.off_dk = size
        size += S * C
        self.off_dv = size
        size += S * C
        self.off_datt = size
        size += S
        self.off_dlogits = size
        size += S * V
        self.off_layers = size
        var field = 0
        self.f_x_in = field
        field += S * C
        self.f_scale1 = field
        field += S
        self.f_xn = field
        field += S * C
        self.f_q = field
        field += S * C
        self.f_k = field
        field += S * C
        self.f_v = field
        field += S * C
        self.f_att = field
        field += H * S * S
        self.f_heads = field
        field += S * C
        self.f_x_mid = field
        field += S * C
        self.f_scale2 = field
        field += S
        self.f_xn2 = field
        field += S * C
        self.f_hidden = field
        field += S * F
        self.f_act = field
        field += S * F
        self.layer_stride = field
        size += n_layer * field
        self.acts = List[Self.Scalar](length=size, fill=0)
        self.tokens = List[Int](length=S + 1, fill=0)
        self.lengths = List[Int](length=1, fill=0)
        self.cache_length = 0
        self.fast = n_embd == FC and n_head == 4 and vocab <= FV
        self.wt = List[Self.Scalar](
            length=(n_layer * FAST_LAYER + FC * FV) if self.fast else 0, fill=0
        )
        self.fa = List[Self.Scalar]()
        self.fcap = 0
        self.fo_e = 0
        self.fo_s0 = 0
        self.fo_xf = 0
        self.fo_dlog = 0
        self.fo_dx = 0
        self.fo_dxn = 0
        self.fo_dheads = 0
        self.fo_dqkv = 0
        self.fo_dact = 0
        self.fo_datt = 0
        self.fo_lse = 0
        self.fo_layers = 0
        self.fl_xin = 0
        self.fl_s1 = 0
        self.fl_xn = 0
        self.fl_qkv = 0
        self.fl_att = 0
        self.fl_heads = 0
        self.fl_xmid = 0
        self.fl_s2 = 0
        self.fl_xn2 = 0
        self.fl_act = 0
        self.fl_stride = 0
        self.phase_ns = List[Int](length=32, fill=0)
        self.phase_clock = 0
        if self.fast:
            self.fast_resize(block + 4 - block % 4)

    def write_to(self, mut writer: Some[Writer]):
        writer.write(
            "NativeModel[",
            Self.dtype,
            "](layers=",
            self.n_layer,
            ", n_embd=",
            self.n_embd,
            ", params=",
            self.n_params,
            ")",
        )

    def write_repr_to(self, mut writer: Some[Writer]):
        self.write_to(writer)

    # ---- parameter offsets (the spec's draw order) -------------------------------------------
    @always_inline
    def wte(self) -> Int:
        return 0

    @always_inline
    def wpe(self) -> Int:
        return self.vocab * self.n_embd

    @always_inline
    def lm_head(self) -> Int:
        return self.wpe() + self.block * self.n_embd

    @always_inline
    def layer_params(self, layer: Int) -> Int:
        """Offset of layer{layer}.attn_wq; wk, wv, wo, fc1, fc2 follow it."""
        var C = self.n_embd
        return self.lm_head() + self.vocab * C + layer * (4 * C * C + 2 * self.hidden * C)

    # ---- activation views ----------------------------------------------------------------------
    @always_inline
    def layer_acts(mut self, layer: Int) -> Buf[Self.dtype]:
        return view(self.acts).at(self.off_layers + layer * self.layer_stride)

    @always_inline
    def layer_input(mut self, layer: Int) -> Buf[Self.dtype]:
        """Input of `layer`; input n_layer is the final output."""
        if layer == self.n_layer:
            return view(self.acts).at(self.off_x_final)
        return self.layer_acts(layer).at(self.f_x_in)

    # ---- forward -----------------------------------------------------------------------------
    def forward_position(mut self, token: Int, t: Int):
        """Every activation of position t, reading keys and values of positions 0..t; the
        logits land in row t of the logits buffer."""
        var C = self.n_embd
        var F = self.hidden
        var S = self.block
        var D = self.head_dim
        var p = view(self.params)
        var acts = view(self.acts)

        var x_embed = acts.at(self.off_x_embed + t * C)
        add_into(x_embed, p.at(self.wte() + token * C), p.at(self.wpe() + t * C), C)
        var s0 = rms_scale(x_embed, C)
        acts[self.off_embed_scale + t] = s0
        scale_into(self.layer_input(0).at(t * C), x_embed, s0, C)

        for layer in range(self.n_layer):
            var a = self.layer_acts(layer)
            var w = p.at(self.layer_params(layer))
            var wq = w
            var wk = w.at(C * C)
            var wv = w.at(2 * C * C)
            var wo = w.at(3 * C * C)
            var fc1 = w.at(4 * C * C)
            var fc2 = w.at(4 * C * C + F * C)
            var x_in = a.at(self.f_x_in + t * C)
            # Attention block: x_mid = Wo(attention(rmsnorm(x_in))) + x_in
            var s1 = rms_scale(x_in, C)
            a[self.f_scale1 + t] = s1
            var xn = a.at(self.f_xn + t * C)
            scale_into(xn, x_in, s1, C)
            var q = a.at(self.f_q + t * C)
            matvec(q, wq, xn, C, C)
            matvec(a.at(self.f_k + t * C), wk, xn, C, C)
            matvec(a.at(self.f_v + t * C), wv, xn, C, C)
            var heads = a.at(self.f_heads + t * C)
            fill(heads, Self.Scalar(0), C)
            for h in range(self.n_head):
                var att = a.at(self.f_att + (h * S + t) * S)
                for j in range(t + 1):
                    att[j] = dot(q.at(h * D), a.at(self.f_k + j * C + h * D), D) * (
                        self.attention_scale
                    )
                softmax_inplace(att, t + 1)
                for j in range(t + 1):
                    axpy(heads.at(h * D), att[j], a.at(self.f_v + j * C + h * D), D)
            var x_mid = a.at(self.f_x_mid + t * C)
            matvec(x_mid, wo, heads, C, C)
            add_into(x_mid, x_mid, x_in, C)
            # MLP block: x_out = fc2(relu(fc1(rmsnorm(x_mid)))) + x_mid
            var s2 = rms_scale(x_mid, C)
            a[self.f_scale2 + t] = s2
            var xn2 = a.at(self.f_xn2 + t * C)
            scale_into(xn2, x_mid, s2, C)
            var hidden = a.at(self.f_hidden + t * F)
            var act = a.at(self.f_act + t * F)
            matvec(hidden, fc1, xn2, F, C)
            for i in range(F):
                act[i] = max(hidden[i], Self.Scalar(0))
            var x_out = self.layer_input(layer + 1).at(t * C)
            matvec(x_out, fc2, act, C, F)
            add_into(x_out, x_out, x_mid, C)

        matvec(
            acts.at(self.off_logits + t * self.vocab),
            p.at(self.lm_head()),
            acts.at(self.off_x_final + t * C),
            self.vocab,
            C,
        )

    # ---- backward ----------------------------------------------------------------------------
    def backward_sequence(mut self, row: Int, n: Int):
        """Adds this sequence's gradients into self.grads, given dlogits [n, V] (already
        weighted by 1 / count) in the dlogits buffer and the activations of its forward
        pass. Follows numpy_backend.NumpyBackend._backward."""
        var C = self.n_embd
        var F = self.hidden
        var S = self.block
        var D = self.head_dim
        var V = self.vocab
        var p = view(self.params)
        var g = view(self.grads)
        var acts = view(self.acts)
        var dx = acts.at(self.off_dx)
        var dwide = acts.at(self.off_dwide)
        var dxn = acts.at(self.off_dxn)
        var dheads = acts.at(self.off_dheads)
        var dq = acts.at(self.off_dq)
        var dk = acts.at(self.off_dk)
        var dv = acts.at(self.off_dv)
        var datt = acts.at(self.off_datt)
        var dlogits = acts.at(self.off_dlogits)

        weight_grad(g.at(self.lm_head()), dlogits, acts.at(self.off_x_final), n, V, C)
        input_grad(dx, dlogits, p.at(self.lm_head()), n, V, C, False)
        for layer in reversed(range(self.n_layer)):
            var a = self.layer_acts(layer)
            var offset = self.layer_params(layer)
            var w = p.at(offset)
            var gw = g.at(offset)
            # MLP block: x = fc2(relu(fc1(rmsnorm(x_mid)))) + x_mid
            var fc1 = 4 * C * C
            var fc2 = fc1 + F * C
            weight_grad(gw.at(fc2), dx, a.at(self.f_act), n, C, F)
            input_grad(dwide, dx, w.at(fc2), n, C, F, False)  # d act [n, F]
            var hidden = a.at(self.f_hidden)
            for i in range(n * F):
                if hidden[i] <= 0:
                    dwide[i] = 0  # relu
            weight_grad(gw.at(fc1), dwide, a.at(self.f_xn2), n, F, C)
            input_grad(dxn, dwide, w.at(fc1), n, F, C, False)  # d xn2 [n, C]
            for t in range(n):
                rmsnorm_backward_acc(
                    dx.at(t * C),
                    a.at(self.f_x_mid + t * C),
                    a[self.f_scale2 + t],
                    dxn.at(t * C),
                    C,
                )
            # Attention block: x_mid = Wo(attention(rmsnorm(x_in))) + x_in
            weight_grad(gw.at(3 * C * C), dx, a.at(self.f_heads), n, C, C)
            input_grad(dheads, dx, w.at(3 * C * C), n, C, C, False)
            fill(dq, Self.Scalar(0), n * C)
            fill(dk, Self.Scalar(0), n * C)
            fill(dv, Self.Scalar(0), n * C)
            var q = a.at(self.f_q)
            var k = a.at(self.f_k)
            var v = a.at(self.f_v)
            for h in range(self.n_head):
                var hd = h * D
                for t in range(n):
                    var att = a.at(self.f_att + (h * S + t) * S)
                    var dh = dheads.at(t * C + hd)
                    # softmax backward: ds = a * (da - sum(da * a)), then the 1/sqrt(D) scale
                    var weighted = Self.Scalar(0)
                    for j in range(t + 1):
                        var da = dot(dh, v.at(j * C + hd), D)
                        datt[j] = da
                        weighted += da * att[j]
                    for j in range(t + 1):
                        var aj = att[j]
                        axpy(dv.at(j * C + hd), aj, dh, D)
                        var ds = aj * (datt[j] - weighted) * self.attention_scale
                        axpy(dq.at(t * C + hd), ds, k.at(j * C + hd), D)
                        axpy(dk.at(j * C + hd), ds, q.at(t * C + hd), D)
            var xn = a.at(self.f_xn)
            weight_grad(gw, dq, xn, n, C, C)
            weight_grad(gw.at(C * C), dk, xn, n, C, C)
            weight_grad(gw.at(2 * C * C), dv, xn, n, C, C)
            input_grad(dxn, dq, w, n, C, C, False)
            input_grad(dxn, dk, w.at(C * C), n, C, C, True)
            input_grad(dxn, dv, w.at(2 * C * C), n, C, C, True)
            for t in range(n):
                rmsnorm_backward_acc(
                    dx.at(t * C),
                    a.at(self.f_x_in + t * C),
                    a[self.f_scale1 + t],
                    dxn.at(t * C),
                    C,
                )
        # Embeddings: dembed = rmsnorm backward of x_embed; scatter into wpe rows and wte rows.
        var first_token = row * (S + 1)
        for t in range(n):
            var dembed = dxn.at(t * C)
            fill(dembed, Self.Scalar(0), C)
            rmsnorm_backward_acc(
                dembed,
                acts.at(self.off_x_embed + t * C),
                acts[self.off_embed_scale + t],
                dx.at(t * C),
                C,
            )
            axpy(g.at(self.wpe() + t * C), Self.Scalar(1), dembed, C)
            axpy(g.at(self.wte() + self.tokens[first_token + t] * C), Self.Scalar(1), dembed, C)

    # ---- the fast path (see the kernels above) -------------------------------------------------
    def fast_resize(mut self, rows: Int):
        """Room for `rows` concatenated positions (a multiple of 4); only when a batch needs
        more than any batch before it."""
        var S = self.block
        var size = 0
        self.fo_e = size
        size += rows * FC
        self.fo_s0 = size
        size += rows
        self.fo_xf = size
        size += rows * FC
        self.fo_dlog = size
        size += rows * FV
        self.fo_dx = size
        size += rows * FC
        self.fo_dxn = size
        size += rows * FC
        self.fo_dheads = size
        size += rows * FC
        self.fo_dqkv = size
        size += rows * FQ
        self.fo_dact = size
        size += rows * FF
        self.fo_datt = size
        size += S * FC
        self.fo_lse = size
        size += 2 * (rows + 16)
        self.fo_layers = size
        var field = 0
        self.fl_xin = field
        field += rows * FC
        self.fl_s1 = field
        field += rows
        self.fl_xn = field
        field += rows * FC
        self.fl_qkv = field
        field += rows * FQ
        self.fl_att = field
        field += rows * S * FC
        self.fl_heads = field
        field += rows * FC
        self.fl_xmid = field
        field += rows * FC
        self.fl_s2 = field
        field += rows
        self.fl_xn2 = field
        field += rows * FC
        self.fl_act = field
        field += rows * FF
        self.fl_stride = field
        size += self.n_layer * field
        self.fa = List[Self.Scalar](length=size, fill=0)
        self.fcap = rows

    def refresh_transposed(mut self):
        """The forward products' copy of every matrix, transposed: per layer wqkv^T [16, 48],
        wo^T [16, 16], fc1^T [16, 64], fc2^T [64, 16]; then lm_head^T [16, 32] (columns past
        vocab stay 0)."""
        if not self.fast:
            return
        var p = view(self.params)
        var wt = view(self.wt)
        for layer in range(self.n_layer):
            var w = p.at(self.layer_params(layer))
            var t = wt.at(layer * FAST_LAYER)
            for blk in range(3):  # wq, wk, wv [16, 16] each -> columns of [16, 48]
                transpose16(t.at(blk * FC), FQ, w.at(blk * FC * FC), FC, FC)
            transpose16(t.at(3 * FC * FC), FC, w.at(3 * FC * FC), FC, FC)
            for blk in range(4):  # fc1 [64, 16] -> [16, 64]
                transpose16(t.at(4 * FC * FC + blk * FC), FF, w.at(4 * FC * FC + blk * FC * FC), FC, FC)
            var fc2 = 4 * FC * FC + FF * FC
            for blk in range(4):  # fc2 [16, 64] -> [64, 16]
                transpose16(t.at(fc2 + blk * FC * FC), FC, w.at(fc2 + blk * FC), FF, FC)
        var lm_t = wt.at(self.n_layer * FAST_LAYER)
        var lm = p.at(self.lm_head())
        transpose16(lm_t, FV, lm, FC, min(self.vocab, FC))
        transpose16(lm_t.at(FC), FV, lm.at(FC * FC), FC, self.vocab - FC)

    def fast_attention(mut self, a: Int, start: Int, n: Int):
        """Causal attention of one sequence (rows start .. start + n) of the layer at a."""
        var fa = view(self.fa)
        var S = self.block
        var qkv = fa.at(a + self.fl_qkv)
        var heads = fa.at(a + self.fl_heads)
        var scale = self.attention_scale
        var within_head = SIMD[DType.int32, 16](0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3)
        var is1 = within_head.eq(1)
        var is2 = within_head.eq(2)
        var is3 = within_head.eq(3)
        for t in range(n):
            var q = qkv.load[16]((start + t) * FQ)
            var arow = fa.at(a + self.fl_att + (start + t) * S * FC)
            var top = SIMD[Self.dtype, 16](Self.Scalar.MIN_FINITE)
            for j in range(t + 1):
                var score = seg4_sum(q * qkv.load[16]((start + j) * FQ + FC)) * scale
                arow.store[16](j * FC, score)
                top = max(top, score)
            # A score row holds each head's score 4 times (lane 4h + d, any d). Lane 4h + k of
            # `packed` takes key j0 + k's, so one exp covers 4 keys instead of 1: the same
            # values, lane for lane, at a quarter of the exp's work (the exp was over half of
            # attention's time in the float64 profile build: 616 -> 472 ns), then spread back
            # over the 4 lanes of each head.
            var total = SIMD[Self.dtype, 16](0)
            var j0 = 0
            while j0 <= t:
                var keys = min(4, t + 1 - j0)
                var packed = arow.load[16](j0 * FC) - top
                if keys > 1:
                    packed = is1.select(arow.load[16]((j0 + 1) * FC) - top, packed)
                if keys > 2:
                    packed = is2.select(arow.load[16]((j0 + 2) * FC) - top, packed)
                if keys > 3:
                    packed = is3.select(arow.load[16]((j0 + 3) * FC) - top, packed)
                var e = exp(packed)
                var e0 = e.shuffle[0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12]()
                arow.store[16](j0 * FC, e0)
                total += e0
                if keys > 1:
                    var e1 = e.shuffle[1, 1, 1, 1, 5, 5, 5, 5, 9, 9, 9, 9, 13, 13, 13, 13]()
                    arow.store[16]((j0 + 1) * FC, e1)
                    total += e1
                if keys > 2:
                    var e2 = e.shuffle[2, 2, 2, 2, 6, 6, 6, 6, 10, 10, 10, 10, 14, 14, 14, 14]()
                    arow.store[16]((j0 + 2) * FC, e2)
                    total += e2
                if keys > 3:
                    var e3 = e.shuffle[3, 3, 3, 3, 7, 7, 7, 7, 11, 11, 11, 11, 15, 15, 15, 15]()
                    arow.store[16]((j0 + 3) * FC, e3)
                    total += e3
                j0 += 4
            var o = SIMD[Self.dtype, 16](0)
            var inverse = 1 / total  # one division, then products
            for j in range(t + 1):
                var aj = arow.load[16](j * FC) * inverse
                arow.store[16](j * FC, aj)
                o += aj * qkv.load[16]((start + j) * FQ + 2 * FC)
            heads.store[16]((start + t) * FC, o)

    def fast_attention_backward(mut self, a: Int, start: Int, n: Int):
        """Writes dq, dk, dv of one sequence into the dqkv rows start .. start + n, from dheads."""
        var fa = view(self.fa)
        var S = self.block
        var qkv = fa.at(a + self.fl_qkv)
        var dqkv = fa.at(self.fo_dqkv)
        var dheads = fa.at(self.fo_dheads)
        var datt = fa.at(self.fo_datt)
        var scale = self.attention_scale
        for i in range(n * FQ // 16):
            dqkv.store[16](start * FQ + i * 16, SIMD[Self.dtype, 16](0))
        for t in range(n):
            var dh = dheads.load[16]((start + t) * FC)
            var q = qkv.load[16]((start + t) * FQ)
            var arow = fa.at(a + self.fl_att + (start + t) * S * FC)
            var weighted = SIMD[Self.dtype, 16](0)
            for j in range(t + 1):
                var da = seg4_sum(dh * qkv.load[16]((start + j) * FQ + 2 * FC))
                datt.store[16](j * FC, da)
                weighted += da * arow.load[16](j * FC)
            var dq = SIMD[Self.dtype, 16](0)
            for j in range(t + 1):
                var aj = arow.load[16](j * FC)
                var ds = aj * (datt.load[16](j * FC) - weighted) * scale
                var row = (start + j) * FQ
                dqkv.store[16](row + 2 * FC, dqkv.load[16](row + 2 * FC) + aj * dh)
                dq += ds * qkv.load[16](row + FC)
                dqkv.store[16](row + FC, dqkv.load[16](row + FC) + ds * q)
            var own = (start + t) * FQ
            dqkv.store[16](own, dqkv.load[16](own) + dq)

    @always_inline
    def mark(mut self, k: Int):
        """PROFILE_PHASES: charges the time since the previous mark to part k."""
        comptime if PROFILE_PHASES:
            var now = perf_counter_ns()
            if k >= 0:
                self.phase_ns[k] += Int(now) - self.phase_clock
            self.phase_clock = Int(now)

    def fast_loss_and_backward(mut self, rows: Int) -> Float64:
        """Computes loss_and_backward for the fast path: all positions of the batch at once."""
        comptime V16 = SIMD[Self.dtype, 16]
        var S = self.block
        var V = self.vocab
        var stride = S + 1
        var n = 0
        for b in range(rows):
            n += self.lengths[b]
        var n4 = (n + 3) // 4 * 4
        if n4 > self.fcap:
            self.fast_resize(n4)
        var fa = view(self.fa)
        var p = view(self.params)
        var g = view(self.grads)
        var wt = view(self.wt)
        self.mark(-1)

        # Embeddings, then the first rmsnorm.
        var x0 = fa.at(self.fo_layers + self.fl_xin)
        var r = 0
        for b in range(rows):
            for t in range(self.lengths[b]):
                var token = self.tokens[b * stride + t]
                var e = p.load[16](self.wte() + token * FC) + p.load[16](self.wpe() + t * FC)
                var s0 = rms16(e)
                fa.store[16](self.fo_e + r * FC, e)
                fa[self.fo_s0 + r] = s0
                x0.store[16](r * FC, e * s0)
                r += 1

        self.mark(0)
        for layer in range(self.n_layer):
            var a = self.fo_layers + layer * self.fl_stride
            var wl = wt.at(layer * FAST_LAYER)
            var x_in = fa.at(a + self.fl_xin)
            var xn = fa.at(a + self.fl_xn)
            for i in range(n):
                var x = x_in.load[16](i * FC)
                var s1 = rms16(x)
                fa[a + self.fl_s1 + i] = s1
                xn.store[16](i * FC, x * s1)
            self.mark(1)
            mm_forward_wide[Self.dtype, FC, FQ, False](fa.at(a + self.fl_qkv), xn, wl, n)
            self.mark(2)
            var start = 0
            for b in range(rows):
                self.fast_attention(a, start, self.lengths[b])
                start += self.lengths[b]
            self.mark(3)
            var x_mid = fa.at(a + self.fl_xmid)
            mm_forward_residual[Self.dtype, FC, FC](
                x_mid, fa.at(a + self.fl_heads), wl.at(3 * FC * FC), x_in, n
            )
            self.mark(4)
            var xn2 = fa.at(a + self.fl_xn2)
            for i in range(n):
                var x = x_mid.load[16](i * FC)
                var s2 = rms16(x)
                fa[a + self.fl_s2 + i] = s2
                xn2.store[16](i * FC, x * s2)
            self.mark(5)
            var act = fa.at(a + self.fl_act)
            mm_forward_wide[Self.dtype, FC, FF, True](act, xn2, wl.at(4 * FC * FC), n)
            self.mark(6)
            var x_out = fa.at(self.fo_xf)
            if layer + 1 < self.n_layer:
                x_out = fa.at(a + self.fl_stride + self.fl_xin)
            mm_forward_residual[Self.dtype, FF, FC](
                x_out, act, wl.at(4 * FC * FC + FF * FC), x_mid, n
            )
            self.mark(7)

        # Logits, softmax, loss and d loss / d logits = (softmax - onehot) / count.
        var dlog = fa.at(self.fo_dlog)
        var xf = fa.at(self.fo_xf)
        var lm_t = wt.at(self.n_layer * FAST_LAYER)
        mm_forward_wide[Self.dtype, FC, FV, False](dlog, xf, lm_t, n)
        self.mark(8)
        var lanes = iota[Self.dtype, FV]()
        var valid = lanes.lt(SIMD[Self.dtype, FV](Self.Scalar(V)))
        var weight = Self.Scalar(1) / Self.Scalar(n)
        var loss_sum = Self.Scalar(0)
        comptime if Self.dtype == DType.float32:
            # log p = (logit - max) - log(sum exp(logit - max)), as numpy_backend has it: the
            # sums and the target logits are collected, then one vector log covers 16
            # positions (a scalar log per position, and indexing a SIMD value by the target,
            # cost more than the rest of the softmax).
            var totals = fa.at(self.fo_lse)
            var target_logits = fa.at(self.fo_lse + self.fcap + 16)
            r = 0
            for b in range(rows):
                for t in range(self.lengths[b]):
                    var logits = dlog.load[FV](r * FV)
                    var top = valid.select(logits, Self.Scalar.MIN_FINITE).reduce_max()
                    var e = valid.select(exp(logits - top), SIMD[Self.dtype, FV](0))
                    var total = e.reduce_add()
                    var probs = e * (1 / total)
                    var target = self.tokens[b * stride + t + 1]
                    totals[r] = total
                    target_logits[r] = dlog[r * FV + target] - top
                    var onehot = lanes.eq(SIMD[Self.dtype, FV](Self.Scalar(target)))
                    dlog.store[FV](r * FV, probs * weight - onehot.select(weight, Self.Scalar(0)))
                    r += 1
            var loss_lanes = SIMD[Self.dtype, 16](0)
            var chunk = 0
            while chunk < n:
                var live = (iota[Self.dtype, 16]() + Self.Scalar(chunk)).lt(Self.Scalar(n))
                var sums = live.select(totals.load[16](chunk), SIMD[Self.dtype, 16](1))
                var shifted = live.select(
                    target_logits.load[16](chunk), SIMD[Self.dtype, 16](0)
                )
                loss_lanes += log(sums) - shifted
                chunk += 16
            loss_sum = loss_lanes.reduce_add()
        else:
            # float64 keeps log(softmax[target]): with the sums' log the losses moved from
            # 7e-14 to 2e-13 off the reference (the parity tests allow 1e-12).
            r = 0
            for b in range(rows):
                for t in range(self.lengths[b]):
                    var logits = dlog.load[FV](r * FV)
                    var top = valid.select(logits, Self.Scalar.MIN_FINITE).reduce_max()
                    var e = valid.select(exp(logits - top), SIMD[Self.dtype, FV](0))
                    var probs = e * (1 / e.reduce_add())
                    var target = self.tokens[b * stride + t + 1]
                    loss_sum -= log(probs[target])
                    var onehot = lanes.eq(SIMD[Self.dtype, FV](Self.Scalar(target)))
                    dlog.store[FV](r * FV, probs * weight - onehot.select(weight, Self.Scalar(0)))
                    r += 1
        self.mark(9)

        # Backward. Matrix gradients are written whole (every position at once); the
        # embedding gradients are scattered, so they start from zero.
        for i in range(self.lm_head() // 16):
            g.store[16](i * 16, V16(0))
        for i in range(self.lm_head() // 16 * 16, self.lm_head()):
            g[i] = 0
        var dx = fa.at(self.fo_dx)
        var dxn = fa.at(self.fo_dxn)
        var dact = fa.at(self.fo_dact)
        var dheads = fa.at(self.fo_dheads)
        var dqkv = fa.at(self.fo_dqkv)
        mm_weight_grad[Self.dtype, FC, FV](g.at(self.lm_head()), dlog, xf, n, V)
        mm_input_grad[Self.dtype, FC, FV](dx, dlog, p.at(self.lm_head()), n, V)
        self.mark(10)
        for layer in reversed(range(self.n_layer)):
            var a = self.fo_layers + layer * self.fl_stride
            var offset = self.layer_params(layer)
            var w = p.at(offset)
            var gw = g.at(offset)
            var fc1 = 4 * FC * FC
            var fc2 = fc1 + FF * FC
            # MLP block
            mm_weight_grad[Self.dtype, FF, FC](gw.at(fc2), dx, fa.at(a + self.fl_act), n, FC)
            # relu's output is > 0 exactly where its input was
            mm_input_grad_relu[Self.dtype, FF, FC](
                dact, dx, w.at(fc2), n, FC, fa.at(a + self.fl_act)
            )
            self.mark(11)
            mm_weight_grad[Self.dtype, FC, FF](gw.at(fc1), dact, fa.at(a + self.fl_xn2), n, FF)
            mm_input_grad[Self.dtype, FC, FF](dxn, dact, w.at(fc1), n, FF)
            self.mark(12)
            var x_mid = fa.at(a + self.fl_xmid)
            for i in range(n):
                var back = rms16_backward(
                    x_mid.load[16](i * FC), fa[a + self.fl_s2 + i], dxn.load[16](i * FC)
                )
                dx.store[16](i * FC, dx.load[16](i * FC) + back)
            self.mark(13)
            # Attention block
            mm_weight_grad[Self.dtype, FC, FC](
                gw.at(3 * FC * FC), dx, fa.at(a + self.fl_heads), n, FC
            )
            mm_input_grad[Self.dtype, FC, FC](dheads, dx, w.at(3 * FC * FC), n, FC)
            self.mark(14)
            var start = 0
            for b in range(rows):
                self.fast_attention_backward(a, start, self.lengths[b])
                start += self.lengths[b]
            self.mark(15)
            mm_weight_grad[Self.dtype, FC, FQ](gw, dqkv, fa.at(a + self.fl_xn), n, FQ)
            mm_input_grad[Self.dtype, FC, FQ](dxn, dqkv, w, n, FQ)
            self.mark(16)
            var x_in = fa.at(a + self.fl_xin)
            for i in range(n):
                var back = rms16_backward(
                    x_in.load[16](i * FC), fa[a + self.fl_s1 + i], dxn.load[16](i * FC)
                )
                dx.store[16](i * FC, dx.load[16](i * FC) + back)
            self.mark(17)
        # Embeddings: rmsnorm backward, scattered into the wte and wpe rows.
        r = 0
        for b in range(rows):
            for t in range(self.lengths[b]):
                var d = rms16_backward(
                    fa.load[16](self.fo_e + r * FC), fa[self.fo_s0 + r], dx.load[16](r * FC)
                )
                var pos = self.wpe() + t * FC
                g.store[16](pos, g.load[16](pos) + d)
                var tok = self.wte() + self.tokens[b * stride + t] * FC
                g.store[16](tok, g.load[16](tok) + d)
                r += 1
        self.mark(18)
        return Float64(loss_sum) / Float64(n)

    # ---- one step ----------------------------------------------------------------------------
    def read_batch(mut self, sequences: PythonObject) raises -> Int:
        """Copies the batch's token rows (a list of lists of ints) into self.tokens and
        self.lengths, checking them; returns the number of rows."""
        ref cpython = Python().cpython()
        var rows = Int(cpython.PyObject_Length(sequences._obj_ptr))
        if rows < 1:
            cpython.PyErr_Clear()
            raise Error("train_step: sequences must be a non-empty list of token lists")
        var stride = self.block + 1
        if len(self.lengths) < rows:
            self.lengths.resize(rows, 0)
            self.tokens.resize(rows * stride, 0)
        for b in range(rows):
            var row = cpython.PyList_GetItem(sequences._obj_ptr, b)
            if not row:
                cpython.PyErr_Clear()
                raise Error("train_step: sequences must be a list of lists of ints")
            var length = Int(cpython.PyObject_Length(row))
            if length < 2 or length > stride:
                cpython.PyErr_Clear()
                raise Error(
                    String(
                        "train_step: a token row must hold 2 to block_size + 1 = ",
                        stride,
                        " tokens, got ",
                        length,
                    )
                )
            for i in range(length):
                var item = cpython.PyList_GetItem(row, i)
                if not item:
                    cpython.PyErr_Clear()
                    raise Error("train_step: a token row must be a list of ints")
                var token = Int(cpython.PyLong_AsSsize_t(item))
                if token == -1 and cpython.PyErr_Occurred():
                    cpython.PyErr_Clear()
                    raise Error("train_step: tokens must be Python ints")
                if token < 0 or token >= self.vocab:
                    cpython.PyErr_Clear()
                    raise Error(
                        String("train_step: token ", token, " is outside [0, ", self.vocab, ")")
                    )
                self.tokens[b * stride + i] = token
            self.lengths[b] = length - 1
        return rows

    def loss_and_backward(mut self, rows: Int) -> Float64:
        """Forward and backward over the batch read by read_batch; gradients in self.grads,
        the loss (mean over every predicted position) returned."""
        if self.fast:
            return self.fast_loss_and_backward(rows)
        var V = self.vocab
        var stride = self.block + 1
        var count = 0
        for b in range(rows):
            count += self.lengths[b]
        var position_weight = Self.Scalar(1) / Self.Scalar(count)
        fill(view(self.grads), Self.Scalar(0), self.n_params)
        var acts = view(self.acts)
        var loss_sum = Self.Scalar(0)
        for b in range(rows):
            var n = self.lengths[b]
            var row = b * stride
            for t in range(n):
                self.forward_position(self.tokens[row + t], t)
            for t in range(n):
                var probs = acts.at(self.off_probs + t * V)
                var dlogits = acts.at(self.off_dlogits + t * V)
                for i in range(V):
                    probs[i] = acts[self.off_logits + t * V + i]
                softmax_inplace(probs, V)
                var target = self.tokens[row + t + 1]
                # log p = (logit - max) - log(sum exp(logit - max)), as numpy_backend has it: a
                # target's probability underflows float32 to 0 early at `large` (loss ~70).
                var logits = acts.at(self.off_logits + t * V)
                var top = logits[0]
                for i in range(1, V):
                    top = max(top, logits[i])
                var total = Self.Scalar(0)
                for i in range(V):
                    total += exp(logits[i] - top)
                loss_sum -= (logits[target] - top) - log(total)
                # d loss / d logits = (softmax - onehot) / count
                scale_into(dlogits, probs, position_weight, V)
                dlogits[target] -= position_weight
            self.backward_sequence(b, n)
        return Float64(loss_sum) / Float64(count)

    def adam(
        mut self, learning_rate: Float64, bias_correction1: Float64, bias_correction2: Float64
    ):
        """Adam on the flat buffers, in numpy_backend's order of operations:
        p -= (lr / bc1) * m / (sqrt(v * (1 / bc2)) + eps). On the fast path one matrix at a
        time, each followed by its transposed copy while it is still in L1 (the four flat
        buffers together are larger than L1)."""
        self.mark(-1)
        if not self.fast:
            self.adam_span(0, self.n_params, learning_rate, bias_correction1, bias_correction2)
            self.mark(20)
            return
        var p = view(self.params)
        var wt = view(self.wt)
        var lm = self.lm_head()
        self.adam_span(0, lm, learning_rate, bias_correction1, bias_correction2)
        for layer in range(self.n_layer):
            var o = self.layer_params(layer)
            var w = p.at(o)
            var t = wt.at(layer * FAST_LAYER)
            for blk in range(3):  # wq, wk, wv [16, 16] each -> columns of [16, 48]
                self.adam_span(
                    o + blk * FC * FC, o + (blk + 1) * FC * FC,
                    learning_rate, bias_correction1, bias_correction2,
                )
                transpose16(t.at(blk * FC), FQ, w.at(blk * FC * FC), FC, FC)
            self.adam_span(
                o + 3 * FC * FC, o + 4 * FC * FC, learning_rate, bias_correction1, bias_correction2
            )
            transpose16(t.at(3 * FC * FC), FC, w.at(3 * FC * FC), FC, FC)
            var fc1 = 4 * FC * FC
            self.adam_span(
                o + fc1, o + fc1 + FF * FC, learning_rate, bias_correction1, bias_correction2
            )
            for blk in range(4):  # fc1 [64, 16] -> [16, 64]
                transpose16(t.at(fc1 + blk * FC), FF, w.at(fc1 + blk * FC * FC), FC, FC)
            var fc2 = fc1 + FF * FC
            self.adam_span(
                o + fc2, o + fc2 + FF * FC, learning_rate, bias_correction1, bias_correction2
            )
            for blk in range(4):  # fc2 [16, 64] -> [64, 16]
                transpose16(t.at(fc2 + blk * FC * FC), FC, w.at(fc2 + blk * FC), FF, FC)
        self.adam_span(
            lm, lm + self.vocab * FC, learning_rate, bias_correction1, bias_correction2
        )
        var lm_t = wt.at(self.n_layer * FAST_LAYER)
        transpose16(lm_t, FV, p.at(lm), FC, min(self.vocab, FC))
        transpose16(lm_t.at(FC), FV, p.at(lm + FC * FC), FC, self.vocab - FC)
        self.mark(20)

    @always_inline
    def adam_span(
        mut self,
        start: Int,
        end: Int,
        learning_rate: Float64,
        bias_correction1: Float64,
        bias_correction2: Float64,
    ):
        """Adam on parameters start ..< end."""
        comptime Wd = simd_width_of[Self.dtype]()
        var b1 = Self.Scalar(self.beta1)
        var b2 = Self.Scalar(self.beta2)
        var one_minus_b1 = Self.Scalar(1 - self.beta1)
        var one_minus_b2 = Self.Scalar(1 - self.beta2)
        var eps = Self.Scalar(self.eps)
        var inv_bc2 = Self.Scalar(1.0 / bias_correction2)
        # Added to v / bc2: the root of a zero v stays finite (and tiny beside eps), and the
        # Newton steps never see a subnormal; it does not change a v / bc2 above about 1e-30
        # (float32) or 1e-184 (float64).
        var tiny = SIMD[Self.dtype, Wd](1e-37 if Self.dtype == DType.float32 else 1e-200)
        var step_size = Self.Scalar(learning_rate / bias_correction1)
        var p = view(self.params)
        var g = view(self.grads)
        var m = view(self.adam_m)
        var v = view(self.adam_v)
        # float64 keeps the moments divided by (1 - beta1) and (1 - beta2) (see
        # moment_scales): each moment update is then one FMA, and the factors move into the
        # constants.
        comptime scaled = Self.dtype == DType.float64
        var step = -step_size * one_minus_b1 if scaled else -step_size
        var root_scale = one_minus_b2 * inv_bc2 if scaled else inv_bc2
        # The update is p + m / d with d = c * (sqrt(x) + eps), c = 1 / step: c is folded into
        # the root's Newton polynomial and eps, and the step costs one FMA.
        var c = 1 / step
        var half_c = SIMD[Self.dtype, Wd](0.5 * c)
        var three_eighths_c = SIMD[Self.dtype, Wd](0.375 * c)
        var eps_c = SIMD[Self.dtype, Wd](eps * c)
        var i = start
        while i + Wd <= end:
            var gi = g.load[Wd](i)
            var mi: SIMD[Self.dtype, Wd]
            var vi: SIMD[Self.dtype, Wd]
            comptime if Self.dtype == DType.float64:
                mi = m.load[Wd](i).fma(b1, gi)
                vi = gi.fma(gi, v.load[Wd](i) * b2)
            else:
                mi = m.load[Wd](i) * b1 + gi * one_minus_b1
                vi = v.load[Wd](i) * b2 + gi * gi * one_minus_b2
            m.store[Wd](i, mi)
            v.store[Wd](i, vi)
            var x = vi.fma(root_scale, tiny)
            # Newton steps from the 14-bit estimates, with r = 1 - x y^2 and e = 1 - d q0:
            # float64 takes sqrt(x) = t (1 + r / 2 + 3 r^2 / 8) and 1 / d = q0 (1 + e + e^2)
            # (relative error about 2^-40; the parity tests see no difference), float32 stops
            # at t (1 + r / 2) and q0 (1 + e).
            var y = _rsqrt14(x)
            var t = x * y
            var r = 1 - t * y
            var d: SIMD[Self.dtype, Wd]
            comptime if Self.dtype == DType.float64:
                d = t.fma(r.fma(r.fma(three_eighths_c, half_c), c), eps_c)
            else:
                d = t.fma(r.fma(half_c, c), eps_c)
            var q0 = _rcp14(d)
            var e = 1 - d * q0
            var q = q0.fma(e, q0)
            comptime if Self.dtype == DType.float64:
                q = q.fma(e, q0)
            p.store[Wd](i, mi.fma(q, p.load[Wd](i)))
            i += Wd
        while i < end:
            var gi = g[i]
            var mi: Self.Scalar
            var vi: Self.Scalar
            comptime if Self.dtype == DType.float64:
                mi = m[i] * b1 + gi
                vi = v[i] * b2 + gi * gi
            else:
                mi = m[i] * b1 + gi * one_minus_b1
                vi = v[i] * b2 + gi * gi * one_minus_b2
            m[i] = mi
            v[i] = vi
            p[i] = p[i] + mi / (sqrt(vi * root_scale) + eps) * step
            i += 1

    def moment_scales(self) -> Tuple[Float64, Float64]:
        """What adam_m and adam_v hold times these is Adam's (m, v): float64 keeps them divided
        by (1 - beta1) and (1 - beta2), float32 as they are."""
        comptime if Self.dtype == DType.float64:
            return (Float64(Self.Scalar(1 - self.beta1)), Float64(Self.Scalar(1 - self.beta2)))
        return (1.0, 1.0)

    # ---- Python-facing methods (self_ptr is the Python object's Mojo value) -------------------
    @staticmethod
    def py_init(out self: Self, args: PythonObject, kwargs: PythonObject) raises:
        """NativeModelXX(vocab, n_embd, n_head, n_layer, block_size, beta1, beta2, eps)."""
        if len(args) != 8:
            raise Error(
                "NativeModel(vocab, n_embd, n_head, n_layer, block_size, beta1, beta2, eps)"
            )
        self = Self(
            Int(py=args[0]),
            Int(py=args[1]),
            Int(py=args[2]),
            Int(py=args[3]),
            Int(py=args[4]),
            Float64(py=args[5]),
            Float64(py=args[6]),
            Float64(py=args[7]),
        )

    @staticmethod
    def py_num_parameters(self_ptr: Pointer[Self, MutAnyOrigin]) -> PythonObject:
        return PythonObject(self_ptr[].n_params)

    @staticmethod
    def py_load_parameters(
        self_ptr: Pointer[Self, MutAnyOrigin], address: PythonObject, count: PythonObject
    ) raises -> PythonObject:
        """Reads n_params float64 values at `address` (a contiguous numpy buffer, draw order)
        and zeroes the Adam moments."""
        ref model = self_ptr[]
        if Int(py=count) != model.n_params:
            raise Error(String("load_parameters: expected ", model.n_params, " values"))
        var source = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.n_params):
            model.params[i] = source[unsafe_offset=i].cast[Self.dtype]()
            model.adam_m[i] = 0
            model.adam_v[i] = 0
        model.refresh_transposed()
        return PythonObject(None)

    @staticmethod
    def py_copy_parameters(
        self_ptr: Pointer[Self, MutAnyOrigin], address: PythonObject, count: PythonObject
    ) raises -> PythonObject:
        """Writes the parameters as n_params float64 values at `address`."""
        ref model = self_ptr[]
        if Int(py=count) != model.n_params:
            raise Error(String("copy_parameters: expected room for ", model.n_params))
        var target = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.n_params):
            target[unsafe_offset=i] = model.params[i].cast[DType.float64]()
        return PythonObject(None)

    @staticmethod
    def py_copy_moments(
        self_ptr: Pointer[Self, MutAnyOrigin],
        m_address: PythonObject,
        v_address: PythonObject,
        count: PythonObject,
    ) raises -> PythonObject:
        """Writes Adam's first and second moments as n_params float64 values each at
        `m_address` and `v_address` (draw order)."""
        ref model = self_ptr[]
        if Int(py=count) != model.n_params:
            raise Error(String("copy_moments: expected room for ", model.n_params))
        var m = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=m_address))
        var v = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=v_address))
        var scales = model.moment_scales()
        for i in range(model.n_params):
            m[unsafe_offset=i] = model.adam_m[i].cast[DType.float64]() * scales[0]
            v[unsafe_offset=i] = model.adam_v[i].cast[DType.float64]() * scales[1]
        return PythonObject(None)

    @staticmethod
    def py_train_step(
        self_ptr: Pointer[Self, MutAnyOrigin],
        sequences: PythonObject,
        learning_rate: PythonObject,
        bias_correction1: PythonObject,
        bias_correction2: PythonObject,
    ) raises -> PythonObject:
        """One step: forward, backward, Adam. Returns the loss as a Python float."""
        ref model = self_ptr[]
        var rows = model.read_batch(sequences)
        var loss = model.loss_and_backward(rows)
        model.adam(
            Float64(py=learning_rate), Float64(py=bias_correction1), Float64(py=bias_correction2)
        )
        return PythonObject(loss)

    @staticmethod
    def py_train_step_overhead(
        self_ptr: Pointer[Self, MutAnyOrigin],
        sequences: PythonObject,
        learning_rate: PythonObject,
        bias_correction1: PythonObject,
        bias_correction2: PythonObject,
    ) raises -> PythonObject:
        """Does train_step's argument passing (tokens read, scalars converted) without the work:
        measures the Python <-> Mojo cost of one step."""
        ref model = self_ptr[]
        var rows = model.read_batch(sequences)
        var total = Float64(py=learning_rate) + Float64(py=bias_correction1)
        total += Float64(py=bias_correction2) + Float64(rows)
        return PythonObject(total * 0)

    @staticmethod
    def py_loss_and_gradients(
        self_ptr: Pointer[Self, MutAnyOrigin], sequences: PythonObject, address: PythonObject
    ) raises -> PythonObject:
        """Loss, with the gradients written as n_params float64 values at `address`; no
        update (for tests)."""
        ref model = self_ptr[]
        var rows = model.read_batch(sequences)
        var loss = model.loss_and_backward(rows)
        var target = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.n_params):
            target[unsafe_offset=i] = model.grads[i].cast[DType.float64]()
        return PythonObject(loss)

    @staticmethod
    def py_reset_cache(self_ptr: Pointer[Self, MutAnyOrigin]) -> PythonObject:
        self_ptr[].cache_length = 0
        return PythonObject(None)

    @staticmethod
    def py_next_logits(
        self_ptr: Pointer[Self, MutAnyOrigin],
        token: PythonObject,
        position: PythonObject,
        address: PythonObject,
    ) raises -> PythonObject:
        """Logits of `token` at `position` (which must be the cache length: sampling runs
        positions 0, 1, ... after reset_cache), written as V float64 values at `address`."""
        ref model = self_ptr[]
        var token_id = Int(py=token)
        var p = Int(py=position)
        if token_id < 0 or token_id >= model.vocab:
            raise Error(String("next_logits: token ", token_id, " outside [0, ", model.vocab, ")"))
        if p != model.cache_length or p >= model.block:
            raise Error(
                String(
                    "next_logits: position ",
                    p,
                    " must equal the cache length ",
                    model.cache_length,
                    " and be < block_size",
                )
            )
        model.forward_position(token_id, p)
        model.cache_length += 1
        var target = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.vocab):
            target[unsafe_offset=i] = model.acts[model.off_logits + p * model.vocab + i].cast[
                DType.float64
            ]()
        return PythonObject(None)

    @staticmethod
    def py_address(self_ptr: Pointer[Self, MutAnyOrigin]) -> PythonObject:
        """The model's address, for the module-level step functions (train_step32/64)."""
        return PythonObject(Int(self_ptr))

    @staticmethod
    def py_profile(
        self_ptr: Pointer[Self, MutAnyOrigin], batches: PythonObject, adam: PythonObject
    ) raises -> PythonObject:
        """Runs real training steps (batches[i], adam[i] = (lr, bc1, bc2)) and returns the mean
        nanoseconds per step of each part: reading the batch, forward and backward, Adam and
        what follows it, then the summed losses (for profiling only)."""
        ref model = self_ptr[]
        var steps = len(batches)
        var read_ns = 0
        var loss_ns = 0
        var adam_ns = 0
        var loss = 0.0
        for i in range(steps):
            var lr = Float64(py=adam[i][0])
            var bc1 = Float64(py=adam[i][1])
            var bc2 = Float64(py=adam[i][2])
            var t0 = perf_counter_ns()
            var rows = model.read_batch(batches[i])
            var t1 = perf_counter_ns()
            loss += model.loss_and_backward(rows)
            var t2 = perf_counter_ns()
            model.adam(lr, bc1, bc2)
            var t3 = perf_counter_ns()
            read_ns += Int(t1 - t0)
            loss_ns += Int(t2 - t1)
            adam_ns += Int(t3 - t2)
        var result = Python.list()
        result.append(Float64(read_ns) / Float64(steps))
        result.append(Float64(loss_ns) / Float64(steps))
        result.append(Float64(adam_ns) / Float64(steps))
        result.append(loss)
        var phases = Python.list()
        for k in range(32):
            phases.append(Float64(model.phase_ns[k]) / Float64(steps))
            model.phase_ns[k] = 0
        result.append(phases)
        return result

    @staticmethod
    def py_noop(self_ptr: Pointer[Self, MutAnyOrigin]) -> PythonObject:
        return PythonObject(None)


# ---- module ------------------------------------------------------------------------------------
def noop() -> PythonObject:
    """Does nothing: times the bare Python -> Mojo call."""
    return PythonObject(None)


def step_at[
    dtype: DType
](
    address: PythonObject,
    sequences: PythonObject,
    learning_rate: PythonObject,
    bias_correction1: PythonObject,
    bias_correction2: PythonObject,
) raises -> PythonObject where dtype.is_floating_point():
    """Runs train_step of the NativeModel at `address` (its address() method): a module-level
    function, because a method call from Python costs about 120 ns more than a function call
    (measured in details(): mojo_noop_method_call_ns against mojo_noop_function_call_ns)."""
    var model = Pointer[NativeModel[dtype], MutAnyOrigin](unsafe_from_address=Int(py=address))
    return NativeModel[dtype].py_train_step(
        model, sequences, learning_rate, bias_correction1, bias_correction2
    )


def simd_width(dtype_name: PythonObject) raises -> PythonObject:
    """The SIMD width (elements) the kernels use for 'float32' or 'float64'."""
    var name = String(py=dtype_name)
    if name == "float32":
        return PythonObject(simd_width_of[DType.float32]())
    if name == "float64":
        return PythonObject(simd_width_of[DType.float64]())
    raise Error("simd_width: dtype must be float32 or float64")


def bind_model[
    dtype: DType
](mut module: PythonModuleBuilder, name: StaticString) raises where dtype.is_floating_point():
    comptime M = NativeModel[dtype]
    _ = (
        module.add_type[M](name)
        .def_py_init[M.py_init]()
        .def_method[M.py_num_parameters]("num_parameters")
        .def_method[M.py_load_parameters]("load_parameters")
        .def_method[M.py_copy_parameters]("copy_parameters")
        .def_method[M.py_copy_moments]("copy_moments")
        .def_method[M.py_train_step]("train_step")
        .def_method[M.py_train_step_overhead]("train_step_overhead")
        .def_method[M.py_loss_and_gradients]("loss_and_gradients")
        .def_method[M.py_reset_cache]("reset_cache")
        .def_method[M.py_next_logits]("next_logits")
        .def_method[M.py_noop]("noop")
        .def_method[M.py_address]("address")
        .def_method[M.py_profile]("profile")
    )


@export
def PyInit_microgpt_native() abi("C") -> PythonObject:
    try:
        var module = PythonModuleBuilder("microgpt_native")
        module.def_function[noop]("noop")
        module.def_function[simd_width]("simd_width")
        module.def_function[step_at[DType.float32]]("train_step32")
        module.def_function[step_at[DType.float64]]("train_step64")
        bind_model[DType.float32](module, "NativeModel32")
        bind_model[DType.float64](module, "NativeModel64")
        return module.finalize()
    except e:
        abort(String("failed to create the microgpt_native module: ", e))
