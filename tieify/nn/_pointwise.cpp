// tieify's CPU kernel for pointwise tied layers: C = A · Bt (+ bias), with an optional
// epilogue for inference: C = act(C · scale[b] + shift[b] (+ residual)), b = row % blocks.
//
// A is the (R, K) row-major matrix of every block of every pixel (R = N·H·W·B rows of
// K = C_in/B channels: a channels-last input, as is), Bt the (K, N) row-major transposed
// filter bank, C the (R, N) row-major output (channels-last again). K and N are small (the
// thin bank: 8-512) and R is huge, a shape BLAS libraries run far below their peak (their
// kernels are built for large K and N). Each register tile holds MR rows × 8·NV columns of C,
// a K-long loop broadcasts A and streams Bt from L1 (A prefetched ahead), and C is written
// once. Where N is not a multiple of 8 (MobileNet's 12 or 20 channels a block), the bank is
// copied with its columns padded to one, and the last tile stores only its real columns.
// The epilogue applies a following batch norm's per-channel affine (which differs per block,
// so it cannot be folded into the shared bank), a residual add and a ReLU while the tile is
// still in registers, saving the three memory-bound passes over the output that the separate
// operators make. Large outputs are written with non-temporal stores, which skip reading the
// output's cache lines from memory before overwriting them (on the AVX2 EPYC measured:
// stream / regular time 0.94-1.05 on ResNet-50's pointwise shapes on a quiet host; in one
// earlier run under load, not side by side, 1.2-1.8x faster on the 56x56 and 28x28 layers).
//
// Built by tieify/nn/_kernel.py with the machine's C++ compiler (-O3 -march=native, OpenMP
// where the compiler has it); GCC/Clang vector extensions, no intrinsics but the stream.

#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

typedef float v8 __attribute__((vector_size(32)));

// Rows are read PREFETCH_TILES tiles ahead of the arithmetic: the hardware prefetcher alone
// left the kernel at half its speed on inputs larger than the cache (one 6-row tile reads 6
// rows at once, a stride it does not follow far enough ahead). 4 was the best of 1, 2, 4, 8
// on ResNet-50's pointwise shapes at batch 8 (AVX2 EPYC): 1.1-1.8x faster than none.
constexpr int PREFETCH_TILES = 4;

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The first `n` (< 8) floats at p, zeros after them: never reads past them.
inline v8 load_part(const float* p, int n) {
  v8 v = {};
  std::memcpy(&v, p, sizeof(float) * n);
  return v;
}

template <bool STREAM>
inline void store8(float* p, v8 v) {
#if defined(__AVX__)
  if (STREAM) {
    _mm256_stream_ps(p, (__m256)v);
    return;
  }
#endif
  std::memcpy(p, &v, sizeof v);
}

// The operands: Bt with ldb columns (N rounded up to 8 where N is not a multiple of it), bias
// (ldb) or null, and the epilogue: per-block scale and shift ((blocks, ldb) row-major, both or
// neither), a residual (R, N) laid out like C, and a ReLU. Row r of C is block r % blocks.
struct Operands {
  const float* bt;
  int64_t ldb;
  const float* bias;
  const float* scale = nullptr;
  const float* shift = nullptr;
  int64_t blocks = 1;
  const float* residual = nullptr;
  bool relu = false;
};

// The epilogue's steps, as template flags.
constexpr int SCALE = 1, RESIDUAL = 2, RELU = 4;

// C[0:MR, n0:n0+width] = A[0:MR, :] · Bt[:, n0:n0+width] (+ bias), then the epilogue when
// EPI. width is 8·NV but for the last tile of a padded bank (then NV = 1, width < 8, and only
// `width` columns of C and of the residual are touched). row0: the tile's first row of C, b0
// its block (row0 % blocks, computed once per row block: a division costs as much as a row
// of a thin bank's arithmetic).
template <int MR, int NV, bool STREAM, int EPI>
inline void tile(const float* __restrict a, int64_t K, const Operands& op, float* __restrict c,
                 int64_t ldc, int64_t row0, int64_t b0, int64_t n0, int width) {
  const float* __restrict bt = op.bt + n0;
  const int64_t ldb = op.ldb;
  v8 acc[MR][NV];
  for (int j = 0; j < NV; ++j) {
    const v8 b0 = op.bias ? load8(op.bias + n0 + 8 * j) : v8{};
    for (int i = 0; i < MR; ++i) acc[i][j] = b0;
  }
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 15) == 0)  // each row's next cache line, PREFETCH_TILES row tiles ahead
      for (int i = 0; i < MR; ++i) __builtin_prefetch(a + (PREFETCH_TILES * MR + i) * K + k);
    v8 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = load8(bt + k * ldb + 8 * j);
    for (int i = 0; i < MR; ++i) {
      const float s = a[i * K + k];
      const v8 av = {s, s, s, s, s, s, s, s};
      for (int j = 0; j < NV; ++j) acc[i][j] += av * b[j];
    }
  }
  const bool part = width < 8 * NV;
  if (EPI) {
    int64_t block = b0;
    for (int i = 0; i < MR; ++i, block = block + 1 == op.blocks ? 0 : block + 1) {
      if (EPI & SCALE) {
        const int64_t at = block * ldb + n0;
        for (int j = 0; j < NV; ++j)
          acc[i][j] = acc[i][j] * load8(op.scale + at + 8 * j) + load8(op.shift + at + 8 * j);
      }
      if (EPI & RESIDUAL) {
        const float* res = op.residual + (row0 + i) * ldc + n0;
        for (int j = 0; j < NV; ++j) acc[i][j] += part ? load_part(res, width) : load8(res + 8 * j);
      }
      if (EPI & RELU)  // NaN stays NaN, as torch.relu keeps it
        for (int j = 0; j < NV; ++j) acc[i][j] = acc[i][j] < v8{} ? v8{} : acc[i][j];
    }
  }
  if (part) {
    for (int i = 0; i < MR; ++i) std::memcpy(c + i * ldc, &acc[i][0], sizeof(float) * width);
    return;
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) store8<STREAM>(c + i * ldc + 8 * j, acc[i][j]);
}

// All N columns of MR rows starting at row0: tiles of 16, then 8, then the padded last one.
template <int MR, bool STREAM, int EPI>
inline void row_block(const float* a, int64_t K, const Operands& op, float* c, int64_t N,
                      int64_t row0) {
  const int64_t b0 = (EPI & SCALE) && op.blocks > 1 ? row0 % op.blocks : 0;
  int64_t n0 = 0;
  for (; n0 + 16 <= N; n0 += 16)
    tile<MR, 2, STREAM, EPI>(a, K, op, c + n0, N, row0, b0, n0, 16);
  for (; n0 + 8 <= N; n0 += 8) tile<MR, 1, STREAM, EPI>(a, K, op, c + n0, N, row0, b0, n0, 8);
  if (n0 < N)
    tile<MR, 1, false, EPI>(a, K, op, c + n0, N, row0, b0, n0, static_cast<int>(N - n0));
}

template <bool STREAM, int EPI>
void run(const float* A, float* C, int64_t R, int64_t K, int64_t N, const Operands& op,
         int threads) {
  constexpr int MR = 6;
  const int64_t blocks = R / MR;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < blocks; ++t)
      row_block<MR, STREAM, EPI>(A + t * MR * K, K, op, C + t * MR * N, N, t * MR);
#if defined(__AVX__)
    if (STREAM) _mm_sfence();  // streamed stores visible before the threads join
#endif
  }
  for (int64_t r = blocks * MR; r < R; ++r)
    row_block<1, false, EPI>(A + r * K, K, op, C + r * N, N, r);
}

template <bool STREAM, int EPI = 0>
void dispatch(const float* A, float* C, int64_t R, int64_t K, int64_t N, const Operands& op,
              int threads) {
  // One instantiation per epilogue (the flags known at compile time keep the tile's
  // accumulators in registers; with run-time tests the ReLU alone cost 1.8x on a K = 8 bank).
  if constexpr (EPI == 0) {
    const int flags = (op.scale ? SCALE : 0) | (op.residual ? RESIDUAL : 0) | (op.relu ? RELU : 0);
    switch (flags) {
      case SCALE: return dispatch<STREAM, SCALE>(A, C, R, K, N, op, threads);
      case RESIDUAL: return dispatch<STREAM, RESIDUAL>(A, C, R, K, N, op, threads);
      case RELU: return dispatch<STREAM, RELU>(A, C, R, K, N, op, threads);
      case SCALE | RESIDUAL: return dispatch<STREAM, SCALE | RESIDUAL>(A, C, R, K, N, op, threads);
      case SCALE | RELU: return dispatch<STREAM, SCALE | RELU>(A, C, R, K, N, op, threads);
      case RESIDUAL | RELU: return dispatch<STREAM, RESIDUAL | RELU>(A, C, R, K, N, op, threads);
      case SCALE | RESIDUAL | RELU:
        return dispatch<STREAM, SCALE | RESIDUAL | RELU>(A, C, R, K, N, op, threads);
      default: return run<STREAM, 0>(A, C, R, K, N, op, threads);
    }
  } else {
    run<STREAM, EPI>(A, C, R, K, N, op, threads);
  }
}

// `rows` rows of `n` columns copied into rows of `ld` columns, zeros after them (or null).
const float* padded(const float* src, int64_t rows, int64_t n, int64_t ld,
                    std::vector<float>& buf) {
  if (!src) return nullptr;
  buf.assign(rows * ld, 0.f);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(&buf[r * ld], src + r * n, sizeof(float) * n);
  return buf.data();
}

}  // namespace

extern "C" {

// Bumped whenever the signature or the contract of tieify_pointwise changes.
int tieify_kernel_abi(void) { return 2; }

// Whether the build has OpenMP (threads > 1 run in parallel) and non-temporal stores.
int tieify_kernel_features(void) {
  int f = 0;
#if defined(_OPENMP)
  f |= 1;
#endif
#if defined(__AVX__)
  f |= 2;
#endif
  return f;
}

// C (R×N) = A (R×K) · Bt (K×N) + bias (N, or null); all row-major, dense, float32.
// Then, where given: C = C · scale[b] + shift[b] with b = row % blocks (scale and shift
// (blocks×N), both or neither), C += residual (R×N, may not alias C), C = max(C, 0) if relu.
// stream != 0 asks for non-temporal stores (used where C is 32-byte aligned and N % 8 == 0).
void tieify_pointwise(const float* A, const float* Bt, float* C, int64_t R, int64_t K,
                      int64_t N, const float* bias, int threads, int stream, const float* scale,
                      const float* shift, int64_t blocks, const float* residual, int relu) {
  const bool affine = scale && shift && blocks > 0;
  Operands op;
  op.ldb = (N + 7) / 8 * 8;
  std::vector<float> bt_pad, bias_pad, scale_pad, shift_pad;
  if (op.ldb == N) {
    op.bt = Bt;
    op.bias = bias;
    op.scale = affine ? scale : nullptr;
    op.shift = affine ? shift : nullptr;
  } else {  // tiles read 8 columns: give them a padded copy of the (small) operands
    op.bt = padded(Bt, K, N, op.ldb, bt_pad);
    op.bias = padded(bias, 1, N, op.ldb, bias_pad);
    op.scale = affine ? padded(scale, blocks, N, op.ldb, scale_pad) : nullptr;
    op.shift = affine ? padded(shift, blocks, N, op.ldb, shift_pad) : nullptr;
  }
  op.blocks = affine ? blocks : 1;
  op.residual = residual;
  op.relu = relu != 0;
  const bool aligned = (reinterpret_cast<uintptr_t>(C) % 32 == 0) && (N % 8 == 0);
  if (stream && aligned)
    dispatch<true>(A, C, R, K, N, op, threads);
  else
    dispatch<false>(A, C, R, K, N, op, threads);
}

}  // extern "C"
