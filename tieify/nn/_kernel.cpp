// tieify's CPU kernel for tied layers on channels-last float32 inputs: the pointwise product
// C = A · Bt (+ bias) and the k×k (2-D) convolution with the shared bank, each with an
// optional epilogue for inference: C = act(C · scale[b] + shift[b] (+ residual)), b the block.
//
// Pointwise: A is the (R, K) row-major matrix of every block of every pixel (R = N·H·W·B rows
// of K = C_in/B channels: a channels-last input, as is), Bt the (K, N) transposed filter bank,
// packed (below), C the (R, N) row-major output (channels-last again). K and N are small (the
// thin bank: 8-512) and R is huge, a shape BLAS libraries run far below their peak (their
// kernels are built for large K and N). Each register tile holds MR rows × 8·NV columns of C,
// a K-long loop broadcasts A and streams its panel of Bt from cache (A prefetched ahead), and
// C is written once. Where N is not a multiple of 8 (MobileNet's 12 or 20 channels a block),
// the last panel is zero-padded to 8 columns, and its tile stores only the real ones.
//
// The packed bank: Bt's columns in the panels the tiles read, of 16 columns while 16 remain,
// then of 8, the last padded with zeros to 8, each panel's (K, width) block stored row-major,
// one panel after the other (K·ldb floats, ldb = N rounded up to 8). A tile's panel is one
// contiguous stretch, read in order: from the row-major (K, N) bank, a 16-column tile read 64
// bytes of every 4·N-byte row, and large banks ran 1.1-1.7x slower (AVX2 EPYC, one thread).
// tieify/nn/_kernel.py packs it (pack()), once per bank.
//
// k×k: the same tiles with one stretch of rows per filter tap, read from a zero-padded copy
// of the input rows under the filter (see run_conv), and, for thin banks of 3-wide filters,
// tiles of pixels that reuse each input value for the three taps of its filter row
// (pixel_tile; with AVX-512 and K = N = 8, two blocks a tile: block_pairs), or Winograd's
// F(2×2, 3×3) (run_winograd). Rows of C are (output pixel, block) pairs, so C is again
// channels-last.
//
// The epilogue applies a following batch norm's per-channel affine (which differs per block,
// so it cannot be folded into the shared bank), a residual add and a ReLU while the tile is
// still in registers, saving the three memory-bound passes over the output that the separate
// operators make. Large outputs are written with non-temporal stores, which skip reading the
// output's cache lines from memory before overwriting them (on the AVX2 EPYC measured:
// stream / regular time 0.94-1.05 on ResNet-50's pointwise shapes on a quiet host; in one
// earlier run under load, not side by side, 1.2-1.8x faster on the 56x56 and 28x28 layers).
//
// With AVX-512 (a build for such a CPU), panels of 16 columns run as 512-bit vectors: row
// tiles of two panels and twelve rows (tile<..., v16>), and for 3-wide filters pixel tiles
// of 14 pixels and one panel (N = 16) or 7 pixels and two (N = 32), whose widths divide
// ResNet's 56, 28 and 14; pointwise products of N <= 8 and N = 16 columns run quad tiles
// (quad_tile: four of the bank's rows a 512-bit vector). On a 2-thread Xeon, ResNet-50's 1×1 and 3×3 shapes of more than 8
// columns a block at batch 8 (34 cases, one run before the row tiles and one after, not
// interleaved) ran at E 0.25-0.75 with the 256-bit tiles and 0.23-1.21 with the row tiles,
// a median 1.44x as fast; the 1×1 shapes at 56×56, bound by memory, 0.6-1.0x (their times
// there moved by 2x between rounds: outputs of 6-26 MB). The pixel tiles, against the row
// tiles (each against widen in the same rounds): 64→64 at B = 4 E 0.78-0.82 (widen 0.74)
// where the row tiles ran 0.71-0.72 (widen 0.73-0.75); 64→64 at B = 2 0.94-0.96 (widen
// 0.95), 128→128 at B = 4 0.89-0.91 (0.87-0.88), 256→256 at B = 8 0.88-0.92 (0.88-0.90).
//
// Built by tieify/nn/_kernel.py with the machine's C++ compiler (-O3 -march=native, OpenMP
// where the compiler has it); GCC/Clang vector extensions, no intrinsics but the streams and
// the masked loads and stores of a panel's narrow part.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace tieify_kernel {

typedef float v8 __attribute__((vector_size(32)));

// Rows are read PREFETCH_TILES tiles ahead of the arithmetic: the hardware prefetcher alone
// left the kernel at half its speed on inputs larger than the cache (one 6-row tile reads 6
// rows at once, a stride it does not follow far enough ahead). 4 was the best of 1, 2, 4, 8
// on ResNet-50's pointwise shapes at batch 8 (AVX2 EPYC): 1.1-1.8x faster than none.
constexpr int PREFETCH_TILES = 4;

// Line k of each row of the tile `tiles` tiles of MR rows after the one at `at` (rows of K
// floats), fetched into L2 where `l2`, else into L1. Requests for L1 wait on its few miss
// buffers, which the tiles' own loads need; requests for L2 do not, but arrive one cache
// level short, so they pay only from far enough ahead. Row tiles (tile()) ask for L2 from
// K = 64 (4 tiles of 12 rows: 12 KB ahead), pair tiles from K = 32, then 8 tiles ahead (6
// KB). On the AVX-512 EPYC (2026-12-03, 2 threads, the input evicted from the cache by a
// 64 MB write before each call, medians of 31 interleaved rounds, against L1 at 4 tiles for
// every K), ResNet-50's pointwise products at batch 8 of K = 64, N = 16 (256→64 at 56×56,
// B = 4; 512→128 at 28×28, B = 8) took 0.71-0.96x the time (two runs), K = 128, N = 32
// 0.87-0.95x, K = 256 0.94-0.97x, the others 0.97-1.05x; the pair tile of K = 32, N = 8
// (256→64 at 56×56, B = 8) 0.92-0.96x in three runs (1.08-1.15x with L2 at 4 tiles), of
// K = 64, N = 8 0.61-0.67x (two runs), of K = 16 1.03-1.06x (kept in L1). (AVX-512 builds
// have since run quad tiles for N <= 8 and N = 16, with distances of their own: quad_tile.)
template <int MR>
__attribute__((always_inline)) inline void prefetch_tile(const float* at, int64_t K, int64_t k,
                                                         int64_t tiles, bool l2) {
  for (int i = 0; i < MR; ++i) {
    const float* p = at + (tiles * MR + i) * K + k;
    if (l2)
      __builtin_prefetch(p, 0, 2);
    else
      __builtin_prefetch(p);
  }
}

// A vector of type V (v8, or v16 with AVX-512; or a float) from p, any alignment.
template <class V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline v8 load8(const float* p) { return load<v8>(p); }

// The first n floats from src to dst, with a copy of a size known at compile time for n < 8:
// a memcpy of a size known only at run time is a call into the C library.
inline void copy_part(float* dst, const float* src, int n) {
  switch (n) {
    case 1: std::memcpy(dst, src, 1 * sizeof(float)); return;
    case 2: std::memcpy(dst, src, 2 * sizeof(float)); return;
    case 3: std::memcpy(dst, src, 3 * sizeof(float)); return;
    case 4: std::memcpy(dst, src, 4 * sizeof(float)); return;
    case 5: std::memcpy(dst, src, 5 * sizeof(float)); return;
    case 6: std::memcpy(dst, src, 6 * sizeof(float)); return;
    case 7: std::memcpy(dst, src, 7 * sizeof(float)); return;
    default: std::memcpy(dst, src, sizeof(float) * n);
  }
}

// The part of a panel narrower than a vector (n < 8 columns: a bank of 2, 4 or 12 columns a
// block), per row of a tile. Loads are masked (AVX-512, else AVX2: only the n floats are
// read, no fault past them): a copy through memory on the stack stalls the load of the whole
// vector from it (the CPU cannot forward the narrower stores to it). A 3×3 layer of 4
// channels a block in and out at 16×16 (batch 1, one thread, AVX-512 EPYC) took 24.5 µs a
// call with its residual read that way and 14.9 without one (2 channels a block: 38.2 and
// 18.3); with masked loads and stores 13.7 and 13.5 (15.1 and 14.5). Stores are masked with
// AVX-512 only: AVX2's masked store is slow on AMD's cores, and the copy through the stack
// (a whole vector stored, the part read back) forwards.
#if defined(__AVX512VL__)
inline __mmask8 part_mask(int n) { return static_cast<__mmask8>((1u << n) - 1); }
#elif defined(__AVX2__)
inline __m256i part_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

// The first `n` (< 8) floats at p, zeros after them: never reads past them.
inline v8 load_part(const float* p, int n) {
#if defined(__AVX512VL__)
  return (v8)_mm256_maskz_loadu_ps(part_mask(n), p);
#elif defined(__AVX2__)
  return (v8)_mm256_maskload_ps(p, part_mask(n));
#else
  float f[8] = {};
  copy_part(f, p, n);
  return load8(f);
#endif
}

// The first `n` (< 8) floats of v to p: never writes past them.
inline void store_part(float* p, v8 v, int n) {
#if defined(__AVX512VL__)
  _mm256_mask_storeu_ps(p, part_mask(n), (__m256)v);
#else
  float f[8];
  std::memcpy(f, &v, sizeof f);
  copy_part(p, f, n);
#endif
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

#if defined(__AVX512F__)
// AVX-512: a 16-column panel in one 512-bit vector (see the top and tile()).
typedef float v16 __attribute__((vector_size(64)));
#endif

// The floats of one vector of type V (v8, or v16 with AVX-512).
template <class V>
constexpr int lanes() {
  return sizeof(V) / sizeof(float);
}

// s in every lane, by a constructor: V{} + s is an add the compiler must keep (-0.0 + 0.0
// is +0.0), and it cost the v16 tiles half their speed (E 0.36 against 0.72 on 64→64 3×3 at
// B = 4, batch 8, 2-thread Xeon).
template <class V>
inline V splat(float s) {
  if constexpr (lanes<V>() == 8)
    return V{s, s, s, s, s, s, s, s};
  else
    return V{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
}

template <bool STREAM, class V>
inline void store(float* p, V v) {  // a v16 as two halves: streamed rows are 32-byte aligned
  if constexpr (lanes<V>() == 8) {
    store8<STREAM>(p, v);
  } else {
    v8 half[2];
    std::memcpy(half, &v, sizeof v);
    store8<STREAM>(p, half[0]);
    store8<STREAM>(p + 8, half[1]);
  }
}

// The operands: the packed bank Bt of krows rows and ldb columns (N rounded up to 8), for a
// pointwise product of N <= 8 columns the same bank in pairs of rows (pair_tile), bias
// (ldb) or null, and the epilogue: per-block scale and shift ((blocks, ldb) row-major, both or
// neither), a residual (R, N) laid out like C, and a ReLU. Row r of C is block r % blocks.
struct Operands {
  const float* bt;
  int64_t ldb;
  int64_t krows;
  const float* pairs = nullptr;  // the bank in pairs of rows, for pair_tile (N <= 8)
  const float* quads = nullptr;  // the bank in fours of rows, for quad_tile (N <= 8, AVX-512)
  const float* doubled = nullptr;  // a 3-wide bank of K = N = 8 twice a row, for block_pairs
  const float* bias2 = nullptr;  // its bias twice (16 floats) or null
  const float* bias;
  const float* scale = nullptr;
  const float* shift = nullptr;
  int64_t blocks = 1;
  const float* residual = nullptr;
  bool relu = false;
};

// The epilogue's steps, as template flags.
constexpr int SCALE = 1, RESIDUAL = 2, RELU = 4;

// A tile's end: the epilogue where EPI, then the store of acc[i] to c + i·ldc (width columns,
// from n0). Row i of the tile is row row0 + i·step of C (its residual row), of block
// (b0 + i·step) % blocks: step 1 for a tile of consecutive rows, blocks for a tile of
// consecutive pixels of one block. Always inlined: GCC called the full epilogue (scale,
// residual, ReLU) out of line, which kept the tile's accumulators in memory through its whole
// K loop (perf annotate): 1×1 chains with a residual ran 3.4-4.2× the plain product's time,
// 1.6-2.1× inlined; 3×3 ones with the batch norm and ReLU 1.06-1.20×, then 1.01-1.07× (AVX2
// EPYC, one thread, best of 30-40 alternations).
template <int MR, int NV, bool STREAM, int EPI, class V = v8>
__attribute__((always_inline)) inline void finish(V (&acc)[MR][NV], const Operands& op,
                                                  float* __restrict c, int64_t ldc, int64_t row0,
                                                  int64_t b0, int64_t step, int64_t n0,
                                                  int width) {
  constexpr int L = lanes<V>();
  const bool part = L == 8 && width < L * NV;  // v8 tiles only: a v16 tile is whole panels
  if (EPI) {
    const int64_t N = step == 1 ? ldc : ldc / step;  // the residual's row length, like C's
    int64_t block = b0;
    for (int i = 0; i < MR; ++i) {
      if (EPI & SCALE) {
        const int64_t at = block * op.ldb + n0;
        for (int j = 0; j < NV; ++j)
          acc[i][j] = acc[i][j] * load<V>(op.scale + at + L * j) + load<V>(op.shift + at + L * j);
        if (step == 1) block = block + 1 == op.blocks ? 0 : block + 1;
      }
      if (EPI & RESIDUAL) {
        const float* res = op.residual + (row0 + i * step) * N + n0;
        for (int j = 0; j < NV; ++j) {
          if constexpr (L == 8)
            acc[i][j] += part ? load_part(res, width) : load8(res + 8 * j);
          else
            acc[i][j] += load<V>(res + L * j);
        }
      }
      if (EPI & RELU)  // NaN stays NaN, as torch.relu keeps it
        for (int j = 0; j < NV; ++j) acc[i][j] = acc[i][j] < V{} ? V{} : acc[i][j];
    }
  }
  if constexpr (L == 8) {
    if (part) {
      for (int i = 0; i < MR; ++i) store_part(c + i * ldc, acc[i][0], width);
      return;
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) store<STREAM>(c + i * ldc + L * j, acc[i][j]);
}

// The rows a tile reads: `taps` row pointers (one per tap of a k×k filter, one for a pointwise
// product), each the tile's first row in a dense matrix of K floats a row (the input's blocks,
// or the padded copy's). Tap t is multiplied by rows [t·K, (t+1)·K) of Bt.
struct Rows {
  const float* const* taps;
  int ntaps;
  int64_t K;
};

// C[0:MR, n0:n0+width] = Σ_t A_t[0:MR, :] · Bt_t[:, n0:n0+width] (+ bias), then the epilogue
// when EPI. width is 8·NV but for the last tile of a padded bank (then NV = 1, width < 8, and
// only `width` columns of C and of the residual are touched). A v8 tile of NV = 4 (32-column
// tiles, below) reads two 16-column panels, vectors 0-1 from the first and 2-3 from the next.
// row0: the tile's first row of C, b0 its block (row0 % blocks, computed once per row block:
// a division costs as much as a row of a thin bank's arithmetic). PREFETCH: the rows stream
// from memory (the pointwise product); a k×k filter reads them from a copy in cache.
// Always inlined: where the compiler called it out of line (from a lambda of the caller), the
// thin banks (K = 8-16) ran 1.1-1.2x slower.
template <int MR, int NV, bool STREAM, int EPI, bool PREFETCH, class V = v8>
__attribute__((always_inline)) inline void tile(const Rows& a, const Operands& op,
                                                float* __restrict c, int64_t ldc, int64_t row0,
                                                int64_t b0, int64_t n0, int width) {
  // v8: one panel of 8·NV columns, vector j its columns 8j..8j+7 (NV <= 2), or two panels of
  // 16 (NV = 4); v16 (AVX-512): NV whole panels of 16 side by side, vector j panel j (16·krows
  // floats after the one before).
  constexpr int L = lanes<V>();
  constexpr int64_t W = L == 8 ? 8 * std::min(NV, 2) : 16;  // a panel's width
  const int64_t K = a.K, K4 = 4 * a.K, next = L == 8 ? 8 : W * op.krows;
  V acc[MR][NV];
  for (int j = 0; j < NV; ++j) {
    const V b0 = op.bias ? load<V>(op.bias + n0 + L * j) : V{};
    for (int i = 0; i < MR; ++i) acc[i][j] = b0;
  }
  for (int t = 0; t < a.ntaps; ++t) {
    const float* __restrict at = a.taps[t];
    const float* __restrict bt = op.bt + n0 * op.krows + t * K * W;  // tap t of the panel
    const float* __restrict at1 = at + K;
    const float* __restrict at2 = at + 2 * K;
    const float* __restrict at3 = at + 3 * K;
    if constexpr (L == 8 && NV == 4) {
      // A 32-column tile (TILE32_MR rows), not unrolled: its twelve accumulators and four
      // panel vectors fill AVX2's sixteen registers, and a second step's vectors spilled:
      // unrolled twice, 0.93-1.11x the time of the 6-row tiles (median 1.01) on ResNet-50's
      // pointwise shapes of N % 32 = 0; not unrolled, 0.84-1.02x (median 0.92; Zen 1 EPYC,
      // batch 8, 2 threads, the same 12 interleaved rounds). Rows are prefetched 24 ahead,
      // as the 6-row tiles do.
      static_assert(MR <= 3, "a 32-column tile holds at most three rows");
      for (int64_t k = 0; k < K; ++k) {
        if (PREFETCH && (k & 15) == 0) prefetch_tile<MR>(at, K, k, 2 * PREFETCH_TILES, K >= 64);
        const float* bk = bt + k * W;  // row k of both panels, the second krows·16 floats on
        const V b[4] = {load<V>(bk), load<V>(bk + 8), load<V>(bk + W * op.krows),
                        load<V>(bk + W * op.krows + 8)};
        for (int i = 0; i < MR; ++i) {
          const V av = splat<V>((i == 0 ? at : i == 1 ? at1 : at2)[k]);
          for (int j = 0; j < 4; ++j) acc[i][j] += av * b[j];
        }
      }
      continue;
    }
    // Unrolled twice: 1.00-1.16x the speed of the plain loop on ResNet-50's 3×3 shapes and
    // 1.00-1.05x on its pointwise ones (AVX2 EPYC, batch 8, 2 threads, 31 interleaved
    // rounds; the larger gains when the host was busy): a filter tap's loop runs only K
    // (often 16-64) steps, and each exit and re-entry costs.
#pragma GCC unroll 2
    for (int64_t k = 0; k < K; ++k) {
      if (PREFETCH && (k & 15) == 0)  // each row's next cache line, PREFETCH_TILES tiles ahead
        prefetch_tile<MR>(at, K, k, PREFETCH_TILES, K >= 64);
      V b[NV];
      for (int j = 0; j < NV; ++j) b[j] = load<V>(bt + j * next + k * W);
#pragma GCC unroll 16  // the accumulators live in registers only when these loops are unrolled
      for (int i = 0; i < MR; ++i) {
        // Rows i, i + 4, i + 8 from one of four pointers and two strides (4 and 8 rows), which
        // x86 addressing adds for free: twelve row offsets would not fit in its registers
        // (spilled, reloaded on every step, they cost a third of the speed).
        const float* row = i % 4 == 0 ? at : i % 4 == 1 ? at1 : i % 4 == 2 ? at2 : at3;
        const V av = splat<V>(row[(i / 4) * K4 + k]);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[i][j] += av * b[j];
      }
    }
  }
  finish<MR, NV, STREAM, EPI, V>(acc, op, c, ldc, row0, b0, 1, n0, width);
}

// Rows a tile of more than 8 columns holds: with AVX-512, 32 vector registers hold twelve
// rows of two v16 accumulators (and the two panels' vectors).
#if defined(__AVX512F__)
constexpr int WIDE_MR = 12;
constexpr bool WIDE = true;
#else
constexpr int WIDE_MR = 6;
constexpr bool WIDE = false;
#endif

// Without AVX-512, a pointwise product of a multiple of 32 columns runs 32-column tiles: three
// rows of four vectors (32 columns, two panels) instead of six of two. Each broadcast of A
// feeds four multiply-adds instead of two, and each row of A is read once per 32 columns
// instead of per 16. ResNet-50's 1×1 shapes of N % 32 = 0 at batch 8 (21 cases, 2 threads,
// 20 interleaved rounds, Zen 1 EPYC): 0.81-1.01x the time of the 6-row tiles, median 0.92
// (0.75-1.04x, median 0.905, in another run). It gains least where the 6-row tiles already
// ran near the peak (the 7×7 layers at B = 4 and 8, 70-75 GFLOP/s: 0.97-1.01x) and on K = 8,
// N = 32 (64→256 at B = 8, bound by its 26 MB output: 0.97-1.04x). Through the layers'
// forward, the other shapes (3×3, and 1×1 of N = 8 or 16) took 0.98-1.02x the time.
constexpr int TILE32_MR = 3;

// All N columns of MR rows of C (c: their first row, row0 its index, b0 its block): tiles of
// 16, then 8, then the padded last one (with AVX-512, tiles of 32 and 16 in 512-bit vectors
// first; a pointwise product of N <= 8 columns runs pair tiles instead). Always inlined (into
// run(), through rows()): GCC had kept it out of line, a call per row block that reloaded the
// operands and set up every tile again, a cost the thin banks' short K loops do not hide.
// Inlined, through the layers' forward on ResNet-50's 36 (shape, B) cases (Zen 1 EPYC,
// batch 8, 2 threads, 12 interleaved rounds): 64→256 at 56×56, B = 8 (K = 8, N = 32) 0.86x
// the time, 512→128 at 28×28, B = 8 (K = 64, N = 16) 0.85x, K = 16 0.93-0.94x, the others
// 0.96-1.01x (median 0.99); the 3×3 layers, which do not call it, 0.98-1.00x.
template <int MR, bool STREAM, int EPI, bool PREFETCH>
__attribute__((always_inline)) inline void row_block(const Rows& a, const Operands& op, float* c,
                                                     int64_t N, int64_t row0, int64_t b0) {
  int64_t n0 = 0;
#if defined(__AVX512F__)
  // Only the first tile prefetches the rows ahead where rows are at least 32 floats: the
  // others read the same rows, in cache by then, and their prefetches only cost issue slots.
  // Against prefetching in every tile (interleaved A/B of the two builds, 2 threads, AVX-512
  // Xeon): 1.03-1.11x on products of K >= 128 and 64-1,024 columns, 0.99-1.04x on the
  // others of K >= 32. Thinner rows stream faster than the arithmetic uses them, and there
  // every tile prefetching was faster (0.90-1.01x without, K = 16, N = 64).
  const bool again = a.K < 32;
  for (; n0 + 32 <= N; n0 += 32)
    if (PREFETCH && (n0 == 0 || again))
      tile<MR, 2, STREAM, EPI, true, v16>(a, op, c + n0, N, row0, b0, n0, 32);
    else
      tile<MR, 2, STREAM, EPI, false, v16>(a, op, c + n0, N, row0, b0, n0, 32);
  for (; n0 + 16 <= N; n0 += 16)
    if (PREFETCH && (n0 == 0 || again))
      tile<MR, 1, STREAM, EPI, true, v16>(a, op, c + n0, N, row0, b0, n0, 16);
    else
      tile<MR, 1, STREAM, EPI, false, v16>(a, op, c + n0, N, row0, b0, n0, 16);
#else
  if constexpr (MR == TILE32_MR)  // 32-column tiles: N is a multiple of 32
    for (; n0 + 32 <= N; n0 += 32)
      tile<MR, 4, STREAM, EPI, PREFETCH>(a, op, c + n0, N, row0, b0, n0, 32);
#endif
  for (; n0 + 16 <= N; n0 += 16)
    tile<MR, 2, STREAM, EPI, PREFETCH>(a, op, c + n0, N, row0, b0, n0, 16);
  for (; n0 + 8 <= N; n0 += 8)
    tile<MR, 1, STREAM, EPI, PREFETCH>(a, op, c + n0, N, row0, b0, n0, 8);
  if (n0 < N)
    tile<MR, 1, false, EPI, PREFETCH>(a, op, c + n0, N, row0, b0, n0, static_cast<int>(N - n0));
}

// A pointwise product's rows in pairs of K (without AVX-512; with it, quad_tile below): for a
// bank of N <= 8 columns, a tile of rows broadcasts one A value per multiply-add (twelve
// broadcasts and one bank load for twelve multiply-adds a step), and the broadcasts, not the
// arithmetic, were its limit: 45-60% of the peak rate in cache (AVX2 EPYC, one thread).
// Here one broadcast of two neighbouring A
// values (a_k, a_k+1) feeds two multiply-adds, each with a vector of the bank's rows k and
// k+1 interleaved (`pairs`, 16 floats a pair of rows, zeros past N: (b_k,n b_k+1,n) for
// columns n = 0, 1, 4, 5 in the first vector, 2, 3, 6, 7 in the second), into two
// accumulators a row of C of partial sums over the even and the odd k. At the end, adding
// neighbours within each 128-bit half puts the columns back in order (one horizontal add).
// An odd K's last row is one ordinary broadcast step after that. 1.33-1.48x the rate of the
// tile of rows for K = 8-128 (a harness of both, one thread, data in cache).
#if defined(__has_builtin)  // separate #ifs: a preprocessor without it cannot parse the call
#if __has_builtin(__builtin_shufflevector)
#define TIEIFY_SHUFFLE 1
#endif
#endif
inline v8 pair_sums(v8 a, v8 b) {  // (a0+a1 a2+a3 b0+b1 b2+b3 | a4+a5 a6+a7 b4+b5 b6+b7)
#if defined(TIEIFY_SHUFFLE)
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
#else
  float x[16];
  std::memcpy(x, &a, sizeof a);
  std::memcpy(x + 8, &b, sizeof b);
  v8 sum;
  for (int h = 0; h < 2; ++h)
    for (int q = 0; q < 4; ++q) {
      const int at = (q / 2) * 8 + h * 4 + (q % 2) * 2;  // half h of a, then of b
      sum[h * 4 + q] = x[at] + x[at + 1];
    }
  return sum;
#endif
}

// Where b_k,n goes in a pair of rows (k % 2 = j) of `pairs` (see above).
inline int64_t pair_slot(int64_t n, int64_t j) {
  return (n / 2) % 2 * 8 + n / 4 * 4 + n % 2 * 2 + j;
}

template <int MR, bool STREAM, int EPI, bool PREFETCH>
__attribute__((always_inline)) inline void pair_tile(const float* at, int64_t K,
                                                     const Operands& op, float* __restrict c,
                                                     int64_t ldc, int64_t row0, int64_t b0,
                                                     int width) {
  typedef double v4d __attribute__((vector_size(32)));
  v8 acc[MR][2] = {};
  const int64_t K4 = 4 * K;
  const float* __restrict at1 = at + K;
  const float* __restrict at2 = at + 2 * K;
  const float* __restrict at3 = at + 3 * K;
  const float* __restrict bp = op.pairs;
  const bool far = K >= 32;  // prefetches into L2, 8 tiles ahead (prefetch_tile)
  for (int64_t k = 0; k + 1 < K; k += 2) {
    if (PREFETCH && (k & 15) == 0)  // as in tile(): each row's next line, tiles ahead
      prefetch_tile<MR>(at, K, k, far ? 2 * PREFETCH_TILES : PREFETCH_TILES, far);
    const v8 lo = load8(bp + 8 * k), hi = load8(bp + 8 * k + 8);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float* row = i % 4 == 0 ? at : i % 4 == 1 ? at1 : i % 4 == 2 ? at2 : at3;
      double two;  // a_k and a_k+1, broadcast as one 64-bit value
      std::memcpy(&two, row + (i / 4) * K4 + k, sizeof two);
      const v8 av = (v8)(v4d{two, two, two, two});
      acc[i][0] += av * lo;
      acc[i][1] += av * hi;
    }
  }
  v8 sum[MR][1];
  const v8 bias = op.bias ? load8(op.bias) : v8{};
  for (int i = 0; i < MR; ++i) sum[i][0] = pair_sums(acc[i][0], acc[i][1]) + bias;
  if (K & 1) {  // the last row of the bank, an ordinary broadcast step
    const v8 b = load8(op.bt + (K - 1) * 8);
    for (int i = 0; i < MR; ++i) {
      const float s = at[i * K + K - 1];
      sum[i][0] += v8{s, s, s, s, s, s, s, s} * b;
    }
  }
  finish<MR, 1, STREAM, EPI>(sum, op, c, ldc, row0, b0, 1, 0, width);
}

#if defined(__AVX512F__) && defined(TIEIFY_SHUFFLE)
#define TIEIFY_QUADS 1
#endif
#if defined(TIEIFY_QUADS)
// With AVX-512, the pair tile's idea four rows of the bank deep, in 512-bit vectors, for N <=
// 8 and N = 16: one 128-bit broadcast of four neighbouring A values (a_k .. a_k+3, four
// times) feeds NQ multiply-adds (2 for N <= 8, 4 for N = 16), each with a vector of four of
// the bank's columns in its rows k .. k+3 interleaved (`quads`, 16·NQ floats a group of four
// rows, zeros past N and K: lane 4q + j of vector v is b_k+j,4v+q), into NQ accumulators a
// row of C of partial sums over k = j mod 4. At the end, neighbour sums within each lane give
// each pair of vectors' 8 columns (quad_sums). An odd K's last K % 4 rows: ordinary broadcast
// steps after that.
// Why: the 256-bit pair tile runs at most half the rate of AVX-512's full-width
// multiply-adds, and a 16-column tile of rows broadcasts one A value per multiply-add, which
// loads limit. On the Zen 5 EPYC (2 threads, 2026-12-04, best of 20 calls) 256→64 at 56×56,
// B = 8 (K = 32, N = 8) took 0.69 ms a call with the pair tile (150 GFLOP/s; the dense
// convolutions ran at 294-438) and 0.38-0.48 with this one; 256→64 at B = 4 (K = 64, N =
// 16) 0.81 ms with the tile of rows, 0.49 with this one. In cache, K = 64, N = 16 ran at
// 250-265 GFLOP/s in the tile of rows, 359-401 in this one (32 columns: 384-409).
//
// Rows a quad tile holds: 12 of two vectors (N <= 8) and 6 of four (N = 16), 24 of the 32
// vector registers. Its rows are prefetched as the pair tile's are (into L2 from K = 32, 4
// tiles ahead, else into L1, 2 tiles ahead). On the Zen 5 EPYC (2 threads, 15 interleaved
// rounds, best of 5 calls each, 25.7 MB inputs), against these: 8 rows of N <= 8 1.02-1.07x
// the time, 4 rows of N = 16 1.23-1.63x, 5 rows 0.87-1.01x; prefetching 8 tiles ahead
// 0.97-1.04x, 2 tiles ahead 0.99-1.05x, into L2 only from K = 64 0.92-1.05x.
constexpr int QUAD_MR = 12, QUAD16_MR = 6;
constexpr int64_t QUAD_FAR_K = 32, QUAD_FAR_TILES = 4, QUAD_NEAR_TILES = 2;
// Each row's columns from its two accumulators lo and hi: neighbour sums within each 128-bit
// lane (one column's four partial sums) of lo and hi interleaved, then one permutation that
// gathers a sum from each lane. Against two rounds of permutations across lanes (two of two
// sources, then two of one), 0.92-0.99x the time on products of N = 8 and 0.97-1.02x on N
// = 16 (Zen 5 EPYC, 2 threads, 15 interleaved rounds, 25.7 MB inputs).
inline v8 quad_sums(v16 lo, v16 hi) {
  // Lane q: (lo_q0 + lo_q2, hi_q0 + hi_q2, lo_q1 + lo_q3, hi_q1 + hi_q3), then the halves added.
  const v16 t1 = __builtin_shufflevector(lo, hi, 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12,
                                         28, 13, 29) +
                 __builtin_shufflevector(lo, hi, 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14,
                                         30, 15, 31);
  const v16 t2 = t1 + __builtin_shufflevector(t1, t1, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14,
                                              15, 12, 13);
  return __builtin_shufflevector(t2, t2, 0, 4, 8, 12, 1, 5, 9, 13);  // lo's sums, then hi's
}

// Where b_k,n goes in a group of four rows (k % 4 = j) of `quads` (see above).
inline int64_t quad_slot(int64_t n, int64_t j) { return n / 4 * 16 + n % 4 * 4 + j; }

template <int MR, int NQ, bool STREAM, int EPI, bool PREFETCH>
__attribute__((always_inline)) inline void quad_tile(const float* at, int64_t K,
                                                     const Operands& op, float* __restrict c,
                                                     int64_t ldc, int64_t row0, int64_t b0,
                                                     int width) {
  constexpr int W = 4 * NQ;  // the bank's padded width: its row length in op.bt
  v16 acc[MR][NQ] = {};
  const int64_t K4 = 4 * K;
  const float* __restrict at1 = at + K;
  const float* __restrict at2 = at + 2 * K;
  const float* __restrict at3 = at + 3 * K;
  const float* __restrict bq = op.quads;
  const bool far = K >= QUAD_FAR_K;
  const int64_t K0 = K & ~int64_t{3};
  for (int64_t k = 0; k < K0; k += 4) {
    if (PREFETCH && (k & 15) == 0)  // as in tile(): each row's next line, tiles ahead
      prefetch_tile<MR>(at, K, k, far ? QUAD_FAR_TILES : QUAD_NEAR_TILES, far);
    v16 b[NQ];
    for (int v = 0; v < NQ; ++v) b[v] = load<v16>(bq + W * k + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float* row = i % 4 == 0 ? at : i % 4 == 1 ? at1 : i % 4 == 2 ? at2 : at3;
      const v16 av = (v16)_mm512_broadcast_f32x4(_mm_loadu_ps(row + (i / 4) * K4 + k));
#pragma GCC unroll 4
      for (int v = 0; v < NQ; ++v) acc[i][v] += av * b[v];
    }
  }
  v8 sum[MR][NQ / 2];
  for (int j = 0; j < NQ / 2; ++j) {
    const v8 bias = op.bias ? load8(op.bias + 8 * j) : v8{};
    for (int i = 0; i < MR; ++i) sum[i][j] = quad_sums(acc[i][2 * j], acc[i][2 * j + 1]) + bias;
  }
  for (int64_t k = K0; k < K; ++k)  // the last K % 4 rows of the bank
    for (int j = 0; j < NQ / 2; ++j) {
      const v8 b = load8(op.bt + k * W + 8 * j);
      for (int i = 0; i < MR; ++i) sum[i][j] += splat<v8>(at[i * K + k]) * b;
    }
  finish<MR, NQ / 2, STREAM, EPI>(sum, op, c, ldc, row0, b0, 1, 0, width);
}
#endif

// Output pixels x0 .. x0 + P - 1 of one block in one image row, for a filter 3 wide with
// stride and dilation 1 along the row and N <= 8 (one vector of columns; with AVX-512 also
// N = 16 and 32, one or two 512-bit vectors): each input value is
// broadcast once and multiplied by the three taps of its filter row into the three outputs it
// reaches (P + 2 broadcasts for 3·P multiply-adds, where a tile of rows spends one a
// multiply-add: the loads, not the arithmetic, were its limit). lines: the kh padded input
// rows; a: the offset in them of pixel x0 of the block; pixel: floats per pixel (blocks·K).
template <int P, bool STREAM, int EPI, class V = v8, int NV = 1>
inline void pixel_tile(const float* const* lines, int64_t kh, int64_t offset, int64_t K,
                       int64_t pixel, const Operands& op, float* __restrict c, int64_t ldc,
                       int64_t row0, int64_t block, int width) {
  // NV panels of W columns, each its bank row-major with rows of W: N <= 8 (padded to 8) in
  // one v8, or, with AVX-512, N = 16 or 32 in one or two v16 (panel j 16·krows floats on).
  constexpr int64_t W = lanes<V>();
  const int64_t next = W * op.krows;
  V acc[P][NV];
  for (int j = 0; j < NV; ++j) {
    const V bias = op.bias ? load<V>(op.bias + W * j) : V{};
    for (int q = 0; q < P; ++q) acc[q][j] = bias;
  }
  for (int64_t i = 0; i < kh; ++i) {
    const float* __restrict a0 = lines[i] + offset;
    const float* __restrict a1 = a0 + pixel;
    const float* __restrict a2 = a0 + 2 * pixel;
    const float* __restrict a3 = a0 + 3 * pixel;
    const int64_t p4 = 4 * pixel;
    const float* __restrict bt = op.bt + 3 * i * K * W;
    for (int64_t k = 0; k < K; ++k) {
      V w0[NV], w1[NV], w2[NV];
      for (int j = 0; j < NV; ++j) {
        w0[j] = load<V>(bt + j * next + k * W);
        w1[j] = load<V>(bt + j * next + (K + k) * W);
        w2[j] = load<V>(bt + j * next + (2 * K + k) * W);
      }
#pragma GCC unroll 16
      for (int p = 0; p < P + 2; ++p) {
        const float* pix = p % 4 == 0 ? a0 : p % 4 == 1 ? a1 : p % 4 == 2 ? a2 : a3;
        const V v = splat<V>(pix[(p / 4) * p4 + k]);  // the four-pointer addressing of tile()
#pragma GCC unroll 2
        for (int j = 0; j < NV; ++j) {
          if (p < P) acc[p][j] += v * w0[j];
          if (p >= 1 && p - 1 < P) acc[p - 1][j] += v * w1[j];
          if (p >= 2) acc[p - 2][j] += v * w2[j];
        }
      }
    }
  }
  // The tile's pixels are ldc / width rows of C apart (one block's: width is N); the affine
  // of block b is row b % op.blocks of the epilogue's (1 row for an identity affine).
  finish<P, NV, STREAM, EPI, V>(acc, op, c, ldc, row0, block % op.blocks, ldc / width, 0, width);
}

#if defined(__AVX512F__)
// Output pixels x0 .. x0 + P - 1 of two neighbouring blocks b, b + 1 at once, for a 3-wide
// filter with stride and dilation 1 and a bank of K = N = 8 (ResNet-50's 64→64 3×3 at B = 8):
// a pixel tile of 8 columns fills half a 512-bit vector (the 256-bit pixel tile ran at half
// the peak rate). The 16 input channels of the two blocks at a pixel are one vector; for each
// k a permutation spreads x[b][k] over lanes 0-7 and x[b + 1][k] over lanes 8-15, and each
// spread value is multiplied by the three taps of its filter row (`doubled`: the bank's rows
// twice, 16 floats each) into the three output pixels it reaches, accumulating both blocks'
// 8 outputs in one vector: a pixel's 16 output channels, stored as they lie in C.
template <int P, bool STREAM, int EPI>
inline void block_pairs(const float* const* lines, int64_t kh, int64_t offset, int64_t pixel,
                        const Operands& op, float* __restrict c, int64_t ldc, int64_t row0,
                        int64_t block) {
  v16 acc[P][1];
  const v16 bias = op.bias2 ? load<v16>(op.bias2) : v16{};
  for (int q = 0; q < P; ++q) acc[q][0] = bias;
  for (int64_t i = 0; i < kh; ++i) {
    const float* __restrict a0 = lines[i] + offset;
    v16 px[P + 2];
    for (int p = 0; p < P + 2; ++p) px[p] = load<v16>(a0 + p * pixel);
    const float* __restrict bt = op.doubled + 3 * i * 8 * 16;  // taps (i, 0), (i, 1), (i, 2)
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const v16 w0 = load<v16>(bt + k * 16), w1 = load<v16>(bt + (8 + k) * 16);
      const v16 w2 = load<v16>(bt + (16 + k) * 16);
      const __m512i spread = _mm512_set_epi32(k + 8, k + 8, k + 8, k + 8, k + 8, k + 8, k + 8,
                                              k + 8, k, k, k, k, k, k, k, k);
#pragma GCC unroll 16
      for (int p = 0; p < P + 2; ++p) {
        const v16 v = (v16)_mm512_permutexvar_ps(spread, (__m512)px[p]);
        if (p < P) acc[p][0] += v * w0;
        if (p >= 1 && p - 1 < P) acc[p - 1][0] += v * w1;
        if (p >= 2) acc[p - 2][0] += v * w2;
      }
    }
  }
  // Pixels ldc / 8 rows of C apart; the affine's rows b, b + 1 (one per block) in one vector.
  finish<P, 1, STREAM, EPI, v16>(acc, op, c, ldc, row0, block, ldc / 8, 0, 16);
}
#endif

// The pointwise product's tiles (the template argument TILE): tiles of rows (row_block), pair
// tiles (N <= 8), or quad tiles of TILE 512-bit vectors a row (AVX-512: 2 for N <= 8, 4 for N
// = 16).
constexpr int ROW_TILES = 0, PAIR_TILES = 1;

// MR rows of the pointwise product from row0, in tiles of the kind TILE. Always inlined:
// called out of line, pair tiles of small K (8-16) ran 1.3-1.5x slower (2 threads,
// interleaved A/B).
template <int MR, bool STREAM, int EPI, bool PREFETCH, int TILE>
__attribute__((always_inline)) inline void rows(const float* A, float* C, int64_t K, int64_t N,
                                                const Operands& op, int64_t row0) {
  const float* at = A + row0 * K;
  const int64_t b0 = (EPI & SCALE) && op.blocks > 1 ? row0 % op.blocks : 0;
  if constexpr (TILE == PAIR_TILES)
    pair_tile<MR, STREAM, EPI, PREFETCH>(at, K, op, C + row0 * N, N, row0, b0,
                                         static_cast<int>(N));
#if defined(TIEIFY_QUADS)
  else if constexpr (TILE != ROW_TILES)
    quad_tile<MR, TILE, STREAM, EPI, PREFETCH>(at, K, op, C + row0 * N, N, row0, b0,
                                               static_cast<int>(N));
#endif
  else
    row_block<MR, STREAM, EPI, PREFETCH>(Rows{&at, 1, K}, op, C + row0 * N, N, row0, b0);
}

// The pointwise product: C (R×N) = A (R×K) · Bt.
template <int MR, bool STREAM, int EPI, int TILE>
void run(const float* A, float* C, int64_t R, int64_t K, int64_t N, const Operands& op,
         int threads) {
  const int64_t blocks = R / MR;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < blocks; ++t) rows<MR, STREAM, EPI, true, TILE>(A, C, K, N, op, t * MR);
#if defined(__AVX__)
    if (STREAM) _mm_sfence();  // streamed stores visible before the threads join
#endif
  }
  for (int64_t r = blocks * MR; r < R; ++r) rows<1, false, EPI, false, TILE>(A, C, K, N, op, r);
}

// f(x) for tile starts x covering [0, n) with tiles of h (h <= n): 0, h, 2h, ..., then one that
// ends at n, overlapping the one before (recomputing a few rows costs less than running
// narrower tiles, whose accumulators wait on each other).
template <class F>
inline void cover(int64_t n, int64_t h, F&& f) {
  int64_t x = 0;
  for (; x + h <= n; x += h) f(x);
  if (x < n) f(n - h);
}

// How many tiles cover() runs.
inline int64_t covers(int64_t n, int64_t h) { return n / h + (n % h != 0); }

// Software prefetch (into L2) of the input rows that the next image row will copy, spread
// over this image row's tiles: each tile issues a few, so the copy (InputRows::row) finds them
// in cache instead of waiting on memory with no arithmetic to overlap. On ResNet-50's 3×3
// shapes and two thin ones at batch 8 (2 threads, AVX2 EPYC), against the build without it
// in three runs of 21 interleaved rounds: 0.99-1.07x, median about 1.03x. Skipping the copy
// altogether (a wrong result, for the bound) was 1.02-1.19x.
class Ahead {
 public:
  void start(const float* from, int64_t floats, int64_t tiles) {
    p_ = reinterpret_cast<const char*>(from);
    end_ = p_ + sizeof(float) * floats;
    per_ = (floats * sizeof(float) / 64 + tiles) / std::max<int64_t>(tiles, 1);
  }
  void step() {
    for (int64_t i = 0; i < per_ && p_ < end_; ++i, p_ += 64) __builtin_prefetch(p_, 0, 2);
  }

 private:
  const char* p_ = nullptr;
  const char* end_ = nullptr;
  int64_t per_ = 0;
};

// A k×k (2-D) convolution of a channels-last input X (n, h, w, blocks·K) with the shared bank,
// into the channels-last output C (n, ho, wo, blocks·N): the same tiles, with one tap per filter
// position. Rows of C are (output pixel, block) pairs; within one output image row, row
// x·blocks + b reads, for tap (i, j), the input pixel (y·sh - ph + i·dh, x·sw - pw + j·dw),
// block b. Each thread copies the input image rows it needs into a small buffer (each row
// once, kept while it is needed), zero-padded at both ends and split into sw phases (columns
// ≡ φ mod sw): in it the rows of a tap are again a matrix of row stride K, for every stride,
// and the padding needs no test. A tap whose input row is padding reads a row of zeros.
struct Conv {
  int64_t n, h, w, blocks, K;  // the input: (n, h, w, blocks·K)
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t ho, wo;
};

class InputRows {
 public:
  explicit InputRows(const Conv& cv, const float* X)
      : cv_(cv), X_(X), slots_((cv.kh - 1) * cv.dh + 1) {
    const int64_t cols = (cv.wo - 1) * cv.sw + (cv.kw - 1) * cv.dw + 1;  // padded columns read
    phase_cols_ = (cols + cv.sw - 1) / cv.sw;
    pixel_ = cv.blocks * cv.K;
    row_ = cv.sw * phase_cols_ * pixel_;
    // 64-byte aligned rows (a cache line; padded rows are a multiple of a pixel): a 512-bit
    // load of a pixel's channels then never spans two lines where a pixel is 16·j floats.
    buf_.assign((slots_ + 1) * row_ + 16, 0.f);
    base_ = buf_.data() + (16 - reinterpret_cast<uintptr_t>(buf_.data()) / 4 % 16) % 16;
    tag_.assign(slots_, -1);
  }
  // Input row iy of image img, padded and split into phases (zeros outside the image).
  const float* row(int64_t img, int64_t iy) {
    if (iy < 0 || iy >= cv_.h) return base_ + slots_ * row_;  // a row of zeros
    const int64_t tag = img * cv_.h + iy;
    const int64_t slot = iy % slots_;
    float* dst = base_ + slot * row_;
    if (tag_[slot] != tag) {
      tag_[slot] = tag;
      const float* src = X_ + tag * cv_.w * pixel_;
      if (cv_.sw == 1) {  // one phase: zeros, the row, zeros
        const int64_t lo = std::min(cv_.pw, phase_cols_);
        const int64_t hi = std::max(lo, std::min(phase_cols_, cv_.pw + cv_.w));
        std::memset(dst, 0, sizeof(float) * lo * pixel_);
        std::memcpy(dst + lo * pixel_, src + (lo - cv_.pw) * pixel_,
                    sizeof(float) * (hi - lo) * pixel_);
        std::memset(dst + hi * pixel_, 0, sizeof(float) * (phase_cols_ - hi) * pixel_);
        return dst;
      }
      for (int64_t p = 0; p < cv_.sw; ++p) {
        float* ph = dst + p * phase_cols_ * pixel_;
        for (int64_t q = 0; q < phase_cols_; ++q) {
          const int64_t ix = q * cv_.sw + p - cv_.pw;
          if (ix >= 0 && ix < cv_.w)
            std::memcpy(ph + q * pixel_, src + ix * pixel_, sizeof(float) * pixel_);
          else
            std::memset(ph + q * pixel_, 0, sizeof(float) * pixel_);
        }
      }
    }
    return dst;
  }
  // The input rows (of image img) that image row y + 1 reads and image row y does not, as
  // one stretch of memory (rows below the image or of the next image: none).
  std::pair<const float*, int64_t> next_rows(int64_t img, int64_t y) const {
    const int64_t last = y * cv_.sh - cv_.ph + (cv_.kh - 1) * cv_.dh;
    const int64_t lo = std::max<int64_t>(last + 1, 0);
    const int64_t hi = std::min(last + cv_.sh, cv_.h - 1);
    if (y + 1 >= cv_.ho || hi < lo) return {nullptr, 0};
    return {X_ + (img * cv_.h + lo) * cv_.w * pixel_, (hi - lo + 1) * cv_.w * pixel_};
  }
  // Where tap column j starts in a padded row: its phase, then its first pixel in it.
  int64_t column(int64_t j) const {
    const int64_t at = j * cv_.dw;
    return (at % cv_.sw) * phase_cols_ * pixel_ + (at / cv_.sw) * pixel_;
  }

 private:
  const Conv& cv_;
  const float* X_;
  int64_t slots_, phase_cols_ = 0, pixel_ = 0, row_ = 0;
  std::vector<float> buf_;  // slots_ rows, then a row of zeros, from base_
  float* base_ = nullptr;
  std::vector<int64_t> tag_;
};

template <int MR, bool STREAM, int EPI>
void run_conv(const Conv& cv, const float* X, float* C, int64_t N, const Operands& op,
              int threads) {
  const int64_t image_rows = cv.n * cv.ho, rows = cv.wo * cv.blocks, T = cv.kh * cv.kw;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    InputRows input(cv, X);
    Ahead ahead;
    std::vector<const float*> line(cv.kh), taps(T);
    std::vector<int64_t> column(cv.kw);
    for (int64_t j = 0; j < cv.kw; ++j) column[j] = input.column(j);
    const int64_t pixel = cv.blocks * cv.K, ldc = cv.blocks * N;
    const bool thin = N <= 8 || (WIDE && (N == 16 || N == 32));  // one or two vectors
    const bool pixels = thin && cv.kw == 3 && cv.sw == 1 && cv.dw == 1;
    // Of a pixel tile: 14 for v16 (ResNet's widths 56, 28, 14 are multiples), else 10.
    const int64_t pixel_width = WIDE && N == 16 && cv.wo >= 14 ? 14
                                : WIDE && N == 32 && cv.wo >= 7 ? 7
                                : cv.wo >= 10                 ? 10
                                : cv.wo >= 4                  ? 4
                                                              : 1;
    const int64_t row_height = rows >= MR ? MR : 1;                     // of a row tile
    // The tiles of one image row (each runs ahead.step() once): pixel tiles for every block,
    // else row tiles in every panel of columns (of 16, then 8, then the padded last one).
    const int64_t panels = WIDE ? N / 32 + N % 32 / 16 + N % 16 / 8 + (N % 8 != 0)
                                : N / 16 + N % 16 / 8 + (N % 8 != 0);
    // Two blocks a pixel tile (block_pairs) for K = N = 8, where the epilogue's affine, if
    // any, has a row for each block (a tile reads two neighbouring rows).
    const bool pairs = pixels && op.doubled && cv.wo >= 7 && cv.blocks % 2 == 0 &&
                       (!op.scale || op.blocks == cv.blocks);
    const int64_t tiles = pairs    ? cv.blocks / 2 * covers(cv.wo, 7)
                          : pixels ? cv.blocks * covers(cv.wo, pixel_width)
                                   : panels * covers(rows, row_height);
#pragma omp for schedule(static)
    for (int64_t yr = 0; yr < image_rows; ++yr) {
      const int64_t img = yr / cv.ho, y = yr % cv.ho;
      for (int64_t i = 0; i < cv.kh; ++i) line[i] = input.row(img, y * cv.sh - cv.ph + i * cv.dh);
      const int64_t first = yr * rows;  // this image row's first row of C
      const auto [next, floats] = input.next_rows(img, y);
      ahead.start(next, floats, tiles);
#if defined(__AVX512F__)
      if (pairs) {  // two blocks a tile (block_pairs), 7 pixels (ResNet's widths are multiples)
        for (int64_t b = 0; b < cv.blocks; b += 2)
          cover(cv.wo, 7, [&](int64_t x) {
            ahead.step();
            const int64_t row = first + x * cv.blocks + b;
            const int64_t off = x * pixel + b * cv.K;
            if (STREAM)
              block_pairs<7, true, EPI>(line.data(), cv.kh, off, pixel, op, C + row * N, ldc,
                                        row, b);
            else
              block_pairs<7, false, EPI>(line.data(), cv.kh, off, pixel, op, C + row * N, ldc,
                                         row, b);
          });
        continue;
      }
#endif
      if (pixels) {
        for (int64_t b = 0; b < cv.blocks; ++b) {
          const auto pixels_from = [&](auto p, int64_t x) {  // pixel_tile<p> on pixels from x
            constexpr int P = decltype(p)::value;
            ahead.step();
            const int64_t row = first + x * cv.blocks + b;
            const int64_t off = x * pixel + b * cv.K;
#if defined(__AVX512F__)
            if (N == 16) {
              if (STREAM && P > 1)
                pixel_tile<P, true, EPI, v16>(line.data(), cv.kh, off, cv.K, pixel, op,
                                              C + row * N, ldc, row, b, 16);
              else
                pixel_tile<P, false, EPI, v16>(line.data(), cv.kh, off, cv.K, pixel, op,
                                               C + row * N, ldc, row, b, 16);
              return;
            }
            if (N == 32) {
              if constexpr (P <= 10) {
                if (STREAM && P > 1)
                  pixel_tile<P, true, EPI, v16, 2>(line.data(), cv.kh, off, cv.K, pixel, op,
                                                   C + row * N, ldc, row, b, 32);
                else
                  pixel_tile<P, false, EPI, v16, 2>(line.data(), cv.kh, off, cv.K, pixel, op,
                                                    C + row * N, ldc, row, b, 32);
              }
              return;
            }
#endif
            if (STREAM && N == 8 && P > 1)
              pixel_tile<P, true, EPI>(line.data(), cv.kh, off, cv.K, pixel, op, C + row * N, ldc,
                                       row, b, static_cast<int>(N));
            else
              pixel_tile<P, false, EPI>(line.data(), cv.kh, off, cv.K, pixel, op, C + row * N,
                                        ldc, row, b, static_cast<int>(N));
          };
          if (WIDE && pixel_width == 14)
            cover(cv.wo, 14, [&](int64_t x) { pixels_from(std::integral_constant<int, 14>{}, x); });
          else if (WIDE && pixel_width == 7)
            cover(cv.wo, 7, [&](int64_t x) { pixels_from(std::integral_constant<int, 7>{}, x); });
          else if (pixel_width == 10)
            cover(cv.wo, 10, [&](int64_t x) { pixels_from(std::integral_constant<int, 10>{}, x); });
          else if (pixel_width == 4)
            cover(cv.wo, 4, [&](int64_t x) { pixels_from(std::integral_constant<int, 4>{}, x); });
          else
            cover(cv.wo, 1, [&](int64_t x) { pixels_from(std::integral_constant<int, 1>{}, x); });
        }
        continue;
      }
      // Rows of the image row, one panel of columns at a time (the panel's part of the bank
      // is read by every tile: for a large bank, one panel stays in cache where all would not).
      const auto rows_from = [&](auto mr, int64_t r, auto nv, bool stream, int64_t n0, int width) {
        constexpr int H = decltype(mr)::value, NV = decltype(nv)::value;
        ahead.step();
        for (int64_t i = 0; i < cv.kh; ++i)
          for (int64_t j = 0; j < cv.kw; ++j) taps[i * cv.kw + j] = line[i] + column[j] + r * cv.K;
        const Rows a{taps.data(), static_cast<int>(T), cv.K};
        const int64_t row = first + r, b0 = (EPI & SCALE) ? r % op.blocks : 0;
        float* c = C + row * N + n0;
#if defined(__AVX512F__)
        if constexpr (NV < 0) {  // -NP: NP whole panels in 512-bit vectors
          if (STREAM && stream)
            tile<H, -NV, true, EPI, false, v16>(a, op, c, N, row, b0, n0, width);
          else
            tile<H, -NV, false, EPI, false, v16>(a, op, c, N, row, b0, n0, width);
          return;
        }
#endif
        if constexpr (NV > 0) {
          if (STREAM && stream)
            tile<H, NV, true, EPI, false>(a, op, c, N, row, b0, n0, width);
          else
            tile<H, NV, false, EPI, false>(a, op, c, N, row, b0, n0, width);
        }
      };
      const auto panel = [&](auto nv, bool stream, int64_t n0, int width) {
        if (row_height == MR)
          cover(rows, MR, [&](int64_t r) {
            rows_from(std::integral_constant<int, MR>{}, r, nv, stream, n0, width);
          });
        else
          cover(rows, 1, [&](int64_t r) {
            rows_from(std::integral_constant<int, 1>{}, r, nv, stream, n0, width);
          });
      };
      int64_t n0 = 0;
#if defined(__AVX512F__)
      for (; n0 + 32 <= N; n0 += 32) panel(std::integral_constant<int, -2>{}, true, n0, 32);
      for (; n0 + 16 <= N; n0 += 16) panel(std::integral_constant<int, -1>{}, true, n0, 16);
#endif
      for (; n0 + 16 <= N; n0 += 16) panel(std::integral_constant<int, 2>{}, true, n0, 16);
      for (; n0 + 8 <= N; n0 += 8) panel(std::integral_constant<int, 1>{}, true, n0, 8);
      if (n0 < N) panel(std::integral_constant<int, 1>{}, false, n0, static_cast<int>(N - n0));
    }
#if defined(__AVX__)
    if (STREAM) _mm_sfence();
#endif
  }
}

// The pointwise product on channels-first (NCHW) tensors: for every image and block b,
// Y[b·N + o, p] = Σ_k W[o, k] · X[b·K + k, p] + bias[o] over the S = H·W pixels p, each block
// a (N×K)·(K×S) product whose pixels are contiguous. A tile is PLANAR_ROWS output channels ×
// 16 pixels: a K-long loop loads 16 pixels of input channel k (two vectors) and broadcasts
// each output channel's weight (the bank packed in tiles of output channels, k-major:
// pack_planar() in tieify/nn/_kernel.py), twelve accumulators. A strip of 16 pixels of the
// block's K input channels is read by every tile of output channels from cache; the first
// tile prefetches the strip PLANAR_AHEAD strips on into L2 (K rows, each far from the next:
// more streams than the hardware prefetcher follows). Into L2 rather than L1 (AVX-512 EPYC,
// 2026-12-03, 2 threads, the input evicted from the cache before each call, medians of 21
// interleaved rounds, two runs): ResNet-50's 1×1 layers 256→64 and 512→128 at batch 8,
// B = 4 and 8, took 0.65-0.82x the time, 1024→256 0.88-0.98x, the others 0.95-0.99x; at
// batch 1 (with MobileNetV3-Large's shapes) 0.77-1.01x. The last strip of an image starts
// at S - 16, overlapping the one before (S >= 16). On ResNet-50's and MobileNetV3-Large's
// 1×1 shapes (benchmarks/nchw_paths.py, batch 1 and 8, 2 threads, AVX2 EPYC) it took
// 0.24-1.80 of the time of PyTorch's native NCHW convolution of the folded input (the
// `native` path), below 1 in 48 of the 51 cases of 784 pixels or more.
constexpr int PLANAR_ROWS = 6;
constexpr int64_t PLANAR_AHEAD = 4;

template <int MR, bool STREAM, bool AHEAD>
__attribute__((always_inline)) inline void planar_tile(const float* __restrict x, int64_t S,
                                                       int64_t K, const float* __restrict wp,
                                                       const float* bias, float* __restrict y,
                                                       int rows) {
  v8 acc[MR][2];
  for (int i = 0; i < MR; ++i) {
    const float b = bias && i < rows ? bias[i] : 0.f;
    acc[i][0] = acc[i][1] = v8{b, b, b, b, b, b, b, b};
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const float* xr = x + k * S;
    if (AHEAD) __builtin_prefetch(xr + 16 * PLANAR_AHEAD, 0, 2);  // into L2: see prefetch_tile
    const v8 x0 = load8(xr), x1 = load8(xr + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const float s = wp[k * MR + i];
      const v8 w = {s, s, s, s, s, s, s, s};
      acc[i][0] += w * x0;
      acc[i][1] += w * x1;
    }
  }
  for (int i = 0; i < MR; ++i)
    if (i < rows) {
      store8<STREAM>(y + i * S, acc[i][0]);
      store8<STREAM>(y + i * S + 8, acc[i][1]);
    }
}

template <bool STREAM>
void run_planar(const float* X, const float* Wp, const float* bias, float* Y, int64_t images,
                int64_t K, int64_t N, int64_t S, int threads) {
  constexpr int MR = PLANAR_ROWS;
  const int64_t strips = covers(S, 16), tiles = (N + MR - 1) / MR;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t u = 0; u < images * strips; ++u) {
      const int64_t image = u / strips, strip = u % strips;  // image: (sample, block) pairs
      const int64_t p = std::min(strip * 16, S - 16);
      const float* x = X + image * K * S + p;
      float* y = Y + image * N * S + p;
      const bool ahead = strip + PLANAR_AHEAD < strips;
      for (int64_t t = 0; t < tiles; ++t) {
        const int rows = static_cast<int>(std::min<int64_t>(MR, N - t * MR));
        const float* b = bias ? bias + t * MR : nullptr;
        if (t == 0 && ahead)
          planar_tile<MR, STREAM, true>(x, S, K, Wp + t * K * MR, b, y + t * MR * S, rows);
        else
          planar_tile<MR, STREAM, false>(x, S, K, Wp + t * K * MR, b, y + t * MR * S, rows);
      }
    }
#if defined(__AVX__)
    if (STREAM) _mm_sfence();
#endif
  }
}

// Either product, with the epilogue's flags and the tile height fixed at compile time (the
// flags known there keep the tile's accumulators in registers; with run-time tests the ReLU
// alone cost 1.8x on a K = 8 bank). conv: null for the pointwise product.
template <bool STREAM, int EPI>
void with_height(const Conv* conv, const float* A, float* C, int64_t R, int64_t K, int64_t N,
                 const Operands& op, int threads) {
  // Tiles of six rows, twelve with AVX-512 (WIDE_MR) where the columns are more than 8
  // (without AVX-512, three rows of 32 columns where N is a multiple of 32: TILE32_MR); pair
  // tiles of six rows for N <= 8, or with AVX-512 quad tiles for N <= 8 and N = 16.
  if (conv)  // thin banks of a 3-wide filter run pixel tiles; the rest is rarer: one height
    run_conv<WIDE_MR, STREAM, EPI>(*conv, A, C, N, op, threads);
#if defined(TIEIFY_QUADS)
  else if (op.quads) {  // quad tiles (AVX-512): N <= 8 in two vectors a row, N = 16 in four
    if (N <= 8)
      run<QUAD_MR, STREAM, EPI, 2>(A, C, R, K, N, op, threads);
    else
      run<QUAD16_MR, STREAM, EPI, 4>(A, C, R, K, N, op, threads);
  }
#endif
  else if (N <= 8) {  // six rows of two accumulators each
    run<6, STREAM, EPI, PAIR_TILES>(A, C, R, K, N, op, threads);
  } else if (!WIDE && N % 32 == 0) {  // 32-column tiles (row_block)
    run<TILE32_MR, STREAM, EPI, ROW_TILES>(A, C, R, K, N, op, threads);
  } else {
    run<WIDE_MR, STREAM, EPI, ROW_TILES>(A, C, R, K, N, op, threads);
  }
}

// Built as two translation units compiled side by side (tieify/nn/_kernel.py passes
// TIEIFY_PART = 0 and 1): each instantiates half of the (STREAM, EPI) pairs, and part 0
// holds the rest of the library too. On the 2-core EPYC each part takes 15 s; before finish()
// was always inlined, 12 s in two parts where one unit took 18 s. Without TIEIFY_PART the
// file is the whole library in one unit.
#if defined(TIEIFY_PART)
#define TIEIFY_PAIR(S, E)                                                                     \
  template void with_height<S, E>(const Conv*, const float*, float*, int64_t, int64_t, int64_t, \
                                  const Operands&, int);
#if TIEIFY_PART == 0
#define TIEIFY_PART0(S, E) TIEIFY_PAIR(S, E)
#define TIEIFY_PART1(S, E) extern TIEIFY_PAIR(S, E)
#else
#define TIEIFY_PART0(S, E) extern TIEIFY_PAIR(S, E)
#define TIEIFY_PART1(S, E) TIEIFY_PAIR(S, E)
#endif
// A streaming pair holds its tails' regular tiles too: about twice the code of the others.
TIEIFY_PART0(true, 0)
TIEIFY_PART0(true, SCALE)
TIEIFY_PART0(true, SCALE | RESIDUAL)
TIEIFY_PART0(false, SCALE | RESIDUAL | RELU)
TIEIFY_PART0(false, SCALE | RELU)
TIEIFY_PART1(true, SCALE | RELU)
TIEIFY_PART1(true, SCALE | RESIDUAL | RELU)
TIEIFY_PART1(false, 0)
TIEIFY_PART1(false, SCALE)
TIEIFY_PART1(false, SCALE | RESIDUAL)
#endif

#if !defined(TIEIFY_PART) || TIEIFY_PART == 0
template <bool STREAM>
void dispatch(const Conv* conv, const float* A, float* C, int64_t R, int64_t K, int64_t N,
              const Operands& op, int threads) {
  const int flags = (op.scale ? SCALE : 0) | (op.residual ? RESIDUAL : 0) | (op.relu ? RELU : 0);
  switch (flags) {
#define TIEIFY_CASE(F) \
  case F: return with_height<STREAM, F>(conv, A, C, R, K, N, op, threads);
    TIEIFY_CASE(0)
    TIEIFY_CASE(SCALE)
    TIEIFY_CASE(SCALE | RESIDUAL)
    TIEIFY_CASE(SCALE | RELU)
    TIEIFY_CASE(SCALE | RESIDUAL | RELU)
#undef TIEIFY_CASE
    default: break;  // a residual or ReLU without the affine: product() gave them one
  }
}

// The 3×3 convolution with stride and dilation 1 by Winograd's minimal filtering F(2×2, 3×3)
// (Lavin & Gray, 2016): each 2×2 tile of output pixels is A^T [Σ_k (G g G^T) ⊙ (B^T d B)] A
// for the 4×4 input tile d under it, 16 products of a K-long sum where the direct
// convolution spends 36: 2.25 times fewer multiply-adds. The 16 transformed banks U = G g G^T
// (16 (K, N) matrices, packed) are made once per bank (tieify/nn/_kernel.py,
// winograd_bank()). A work item is a run of tiles of one image: their input tiles
// transformed (B^T d B, additions only) into V, 16 (tiles·blocks, K) matrices, the 16
// products M = V · U by the tiles of the pointwise product, and the output transform
// (A^T M A, additions only) with the epilogue, written channels-last. Every step runs over
// the channels of a pixel, contiguous in a channels-last tensor, in whole vectors; V and M
// of one run (a row of tiles) stay in the L2 cache. ResNet-50's 3×3 layers at batch 8 on a
// 2-thread AVX-512 Xeon (channels-last, medians of 7 rounds of 15 calls, side by side;
// 2026-12-02 14:46 UTC), Winograd / direct kernel / widen in ms, K = N channels a block:
// 32 at 56×56 2.09 / 2.35 / 2.49, 64 and 32 at 28×28 1.86 / 2.63 / 2.44 and 1.08 / 1.19 /
// 1.29, 128, 64 and 32 at 14×14 1.50 / 3.00 / 2.34, 0.90 / 1.27 / 1.22 and 0.50 / 0.59 /
// 0.66; with K = 16 the transforms and the thin products cost more than they save (56×56
// 1.70 / 1.33 / 1.57, 28×28 0.89 / 0.67 / 0.81): winograd_applies() in tieify/nn/_kernel.py
// is the rule. Its error against a float64 reference on those shapes of K >= 32 (and the
// 7×7 ones; batch 2) was 2.2e-7 to 6.7e-7 of the largest output, the direct kernel's 5.7e-7
// to 1.9e-6: each point's sum is K terms long, the direct one 9·K (the transforms'
// coefficients 0, ±1/2, ±1 are exact). A NaN or an infinity in the input reaches exactly
// the outputs whose 3×3 field holds it, as in the direct convolution, but an infinity
// arrives as NaN: the transforms subtract it from itself.
struct Winograd {
  int64_t n, h, w, blocks, K, N, ph, pw, ho, wo;
};

// v at p, any alignment: T float or a vector type (v8, v16); load<T> reads them.
template <class T>
inline void put(float* p, T v) {
  std::memcpy(p, &v, sizeof v);
}

// B^T d B for channels [c, c + lanes) of one input tile (src: its 16 pixels, row-major, each
// a pixel's channels or zeros), into point p of V at v + p·ps + c.
template <class T>
inline void input_tile(const float* const (&src)[4][4], int64_t c, float* v, int64_t ps) {
  T d[4][4], t[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) d[i][j] = load<T>(src[i][j] + c);
  for (int j = 0; j < 4; ++j) {  // B^T d, B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
    t[0][j] = d[0][j] - d[2][j];
    t[1][j] = d[1][j] + d[2][j];
    t[2][j] = d[2][j] - d[1][j];
    t[3][j] = d[1][j] - d[3][j];
  }
  for (int i = 0; i < 4; ++i) {  // (B^T d) B
    put<T>(v + (4 * i + 0) * ps + c, t[i][0] - t[i][2]);
    put<T>(v + (4 * i + 1) * ps + c, t[i][1] + t[i][2]);
    put<T>(v + (4 * i + 2) * ps + c, t[i][2] - t[i][1]);
    put<T>(v + (4 * i + 3) * ps + c, t[i][1] - t[i][3]);
  }
}

// A^T M A for output channels [c, c + lanes) of one tile (point p of M at m + p·ms + c), then
// y · scale + shift (+ residual), ReLU, stored to the tile's pixels inside the output (dst
// null outside; res null without a residual).
template <class T>
inline void output_tile(const float* m, int64_t ms, int64_t c, const float* scale,
                        const float* shift, float* const (&dst)[2][2],
                        const float* const (&res)[2][2], bool relu) {
  T s0[4], s1[4];  // A^T M, A^T = [1 1 1 0; 0 1 -1 -1]
  for (int j = 0; j < 4; ++j) {
    const T m0 = load<T>(m + j * ms + c), m1 = load<T>(m + (4 + j) * ms + c);
    const T m2 = load<T>(m + (8 + j) * ms + c), m3 = load<T>(m + (12 + j) * ms + c);
    s0[j] = m0 + m1 + m2;
    s1[j] = m1 - m2 - m3;
  }
  const T y[2][2] = {{s0[0] + s0[1] + s0[2], s0[1] - s0[2] - s0[3]},
                     {s1[0] + s1[1] + s1[2], s1[1] - s1[2] - s1[3]}};
  const T a = load<T>(scale + c), b = load<T>(shift + c);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      if (!dst[i][j]) continue;
      T out = y[i][j] * a + b;
      if (res[i][j]) out += load<T>(res[i][j] + c);
      if (relu) out = out < T{} ? T{} : out;  // NaN stays NaN, as torch.relu keeps it
      put<T>(dst[i][j] + c, out);
    }
}

// f(p, c) over the channels [0, n) of a pixel in vectors (v16 with AVX-512, v8), then one by
// one: f is called with a value of each type, for its template argument.
template <class F>
inline void over_channels(int64_t n, F&& f) {
  int64_t c = 0;
#if defined(__AVX512F__)
  for (; c + 16 <= n; c += 16) f(v16{}, c);
#endif
  for (; c + 8 <= n; c += 8) f(v8{}, c);
  for (; c < n; ++c) f(0.f, c);
}

// C (R×N) = A (R×K) · the packed bank of op, no epilogue: the pointwise product's row tiles,
// then tiles of 4 rows for the rest (the last one overlapping the rows before it). Covering
// the rest with one more WIDE_MR-row tile instead recomputed up to 11 rows: a run's 28 rows
// (a 28-wide map's 14 tiles at B = 2, a 14-wide one's 7 at B = 4) took three 12-row tiles.
inline void product_rows(const float* A, float* C, int64_t R, int64_t K, int64_t N,
                         const Operands& op) {
  int64_t r = 0;
  for (; r + WIDE_MR <= R; r += WIDE_MR) rows<WIDE_MR, false, 0, false, ROW_TILES>(A, C, K, N, op, r);
  if (R < 4) {
    for (; r < R; ++r) rows<1, false, 0, false, ROW_TILES>(A, C, K, N, op, r);
    return;
  }
  for (; r + 4 <= R; r += 4) rows<4, false, 0, false, ROW_TILES>(A, C, K, N, op, r);
  if (r < R) rows<4, false, 0, false, ROW_TILES>(A, C, K, N, op, R - 4);
}

// U: the 16 packed banks (winograd_bank()), point p at p·K·ldb; scale and shift (blocks·N,
// the output's channels): the bias and the epilogue's affine folded together.
void run_winograd(const Winograd& g, const float* X, const float* U, float* Y,
                  const float* scale, const float* shift, const float* residual, bool relu,
                  int threads) {
  const int64_t TY = (g.ho + 1) / 2, TX = (g.wo + 1) / 2, tiles = TY * TX;
  const int64_t C = g.blocks * g.K, CN = g.blocks * g.N;
  const int64_t ldb = (g.N + 7) / 8 * 8;
  // A run: a row of tiles, or more where that gives the products fewer than two row tiles,
  // or fewer where its V and M would take more than 1 MiB (a wide image of many channels):
  // runs may start and end anywhere in a row.
  const int64_t fewest = (2 * WIDE_MR + g.blocks - 1) / g.blocks;
  const int64_t most = std::max<int64_t>(fewest, (int64_t{1} << 20) / (64 * (C + CN)));
  const int64_t run = std::min(tiles, std::max(fewest, std::min(TX, most)));
  const int64_t runs = (tiles + run - 1) / run;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int64_t ps = run * C, ms = run * CN;  // one point's V and M
    std::vector<float> V(16 * ps), M(16 * ms), zeros(C, 0.f);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < g.n * runs; ++item) {
      const int64_t img = item / runs, t0 = item % runs * run;
      const int64_t count = std::min(run, tiles - t0);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t y0 = (t0 + t) / TX * 2 - g.ph, x0 = (t0 + t) % TX * 2 - g.pw;
        const float* src[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) {
            const int64_t y = y0 + i, x = x0 + j;
            const bool in = y >= 0 && y < g.h && x >= 0 && x < g.w;
            src[i][j] = in ? X + ((img * g.h + y) * g.w + x) * C : zeros.data();
          }
        float* v = V.data() + t * C;
        over_channels(C, [&](auto type, int64_t c) {
          input_tile<decltype(type)>(src, c, v, ps);
        });
      }
      for (int p = 0; p < 16; ++p) {
        Operands op;
        op.bt = U + p * g.K * ldb;
        op.ldb = ldb;
        op.krows = g.K;
        op.bias = nullptr;
        product_rows(V.data() + p * ps, M.data() + p * ms, count * g.blocks, g.K, g.N, op);
      }
      for (int64_t t = 0; t < count; ++t) {
        const int64_t ty = (t0 + t) / TX, tx = (t0 + t) % TX;
        float* dst[2][2];
        const float* res[2][2];
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) {
            const int64_t y = 2 * ty + i, x = 2 * tx + j;
            const int64_t at = ((img * g.ho + y) * g.wo + x) * CN;
            const bool in = y < g.ho && x < g.wo;
            dst[i][j] = in ? Y + at : nullptr;
            res[i][j] = in && residual ? residual + at : nullptr;
          }
        const float* m = M.data() + t * CN;
        over_channels(CN, [&](auto type, int64_t c) {
          output_tile<decltype(type)>(m, ms, c, scale, shift, dst, res, relu);
        });
      }
    }
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

// The operands made ready (bias and affine padded to whole tiles where N is not a multiple of
// 8; the packed bank already is) and the product run. K: the rows of Bt.
void product(const Conv* conv, const float* A, const float* Bt, float* C, int64_t R, int64_t K,
             int64_t N, const float* bias, int threads, int stream, const float* scale,
             const float* shift, int64_t blocks, const float* residual, int relu) {
  const bool affine = scale && shift && blocks > 0;
  Operands op;
  op.bt = Bt;
  op.ldb = (N + 7) / 8 * 8;
  op.krows = K;
  std::vector<float> bias_pad, scale_pad, shift_pad;
  if (op.ldb == N) {
    op.bias = bias;
    op.scale = affine ? scale : nullptr;
    op.shift = affine ? shift : nullptr;
  } else {  // tiles read 8 columns: give them a padded copy of the (small) operands
    op.bias = padded(bias, 1, N, op.ldb, bias_pad);
    op.scale = affine ? padded(scale, blocks, N, op.ldb, scale_pad) : nullptr;
    op.shift = affine ? padded(shift, blocks, N, op.ldb, shift_pad) : nullptr;
  }
  std::vector<float> pairs;
#if defined(TIEIFY_QUADS)
  if (!conv && (N <= 8 || N == 16)) {  // the bank's rows in fours, interleaved (quad_tile)
    const int64_t W = op.ldb;  // 8 or 16: the packed bank's one panel, (K, W) row-major
    pairs.assign((K + 3) / 4 * 4 * W, 0.f);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n)
        pairs[(k / 4) * 4 * W + quad_slot(n, k & 3)] = Bt[k * W + n];
    op.quads = pairs.data();
  }
#else
  if (!conv && N <= 8) {  // the bank's rows in pairs, interleaved (pair_tile)
    pairs.assign((K + 1) / 2 * 16, 0.f);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) pairs[(k / 2) * 16 + pair_slot(n, k & 1)] = Bt[k * 8 + n];
    op.pairs = pairs.data();
  }
#endif
  std::vector<float> doubled, bias2;
  if (WIDE && conv && N == 8 && conv->K == 8 && conv->kw == 3 && conv->sw == 1 &&
      conv->dw == 1) {  // the bank's rows twice, for block_pairs
    doubled.resize(K * 16);
    for (int64_t r = 0; r < K; ++r)
      for (int j = 0; j < 16; ++j) doubled[r * 16 + j] = Bt[r * 8 + j % 8];
    op.doubled = doubled.data();
    if (bias) {
      bias2.resize(16);
      for (int j = 0; j < 16; ++j) bias2[j] = bias[j % 8];
      op.bias2 = bias2.data();
    }
  }
  op.blocks = affine ? blocks : 1;
  std::vector<float> unit;
  if (!affine && (residual || relu)) {  // an identity affine: four instantiations fewer
    unit.assign(2 * op.ldb, 0.f);
    std::fill(unit.begin(), unit.begin() + op.ldb, 1.f);
    op.scale = unit.data();
    op.shift = unit.data() + op.ldb;
  }
  op.residual = residual;
  op.relu = relu != 0;
  const bool aligned = (reinterpret_cast<uintptr_t>(C) % 32 == 0) && (N % 8 == 0);
  if (stream && aligned)
    dispatch<true>(conv, A, C, R, K, N, op, threads);
  else
    dispatch<false>(conv, A, C, R, K, N, op, threads);
}

// The layout copies of a tied layer on NCHW input (its k×k kernel conv runs on a
// channels-last copy, its output copied back): each of `planes` (R×C) row-major matrices of
// src transposed into dst, dst[p][c][r] = src[p][r][c] (NCHW to channels-last: R channels,
// C = H·W pixels; back: R pixels, C channels). Strips of 16 rows of src, 8 columns a step,
// two 8×8 blocks transposed in registers (three rounds of shuffles): each step reads 32
// bytes of 16 rows and writes a whole 64-byte line of 8 rows of dst. PyTorch's copy to and
// from channels-last took 7-9x a plain copy of the same tensor (8×64×56×56: 0.67 and 0.91 ms
// against 0.10; AVX-512 EPYC, 2 threads, in cache).
#if defined(TIEIFY_SHUFFLE)
inline void transpose8(const float* s, int64_t ls, float* d, int64_t ld) {
#define TIEIFY_LO(a, b) __builtin_shufflevector(a, b, 0, 8, 1, 9, 4, 12, 5, 13)
#define TIEIFY_HI(a, b) __builtin_shufflevector(a, b, 2, 10, 3, 11, 6, 14, 7, 15)
#define TIEIFY_LO2(a, b) __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13)
#define TIEIFY_HI2(a, b) __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15)
#define TIEIFY_LO4(a, b) __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11)
#define TIEIFY_HI4(a, b) __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15)
  v8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = load8(s + i * ls);
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved: (0 1), (2 3), (4 5), (6 7)
    t[i] = TIEIFY_LO(r[i], r[i + 1]);
    t[i + 1] = TIEIFY_HI(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // then pairs of pairs, within each 128-bit half
    u[i] = TIEIFY_LO2(t[i], t[i + 2]);
    u[i + 1] = TIEIFY_HI2(t[i], t[i + 2]);
    u[i + 2] = TIEIFY_LO2(t[i + 1], t[i + 3]);
    u[i + 3] = TIEIFY_HI2(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // then the halves: column j and j + 4 of the 8 rows
    store8<false>(d + j * ld, TIEIFY_LO4(u[j], u[j + 4]));
    store8<false>(d + (j + 4) * ld, TIEIFY_HI4(u[j], u[j + 4]));
  }
#undef TIEIFY_LO
#undef TIEIFY_HI
#undef TIEIFY_LO2
#undef TIEIFY_HI2
#undef TIEIFY_LO4
#undef TIEIFY_HI4
}
#endif

void transpose(const float* src, float* dst, int64_t planes, int64_t R, int64_t C,
               int threads) {
  constexpr int64_t RB = 16;
  const int64_t strips = (R + RB - 1) / RB;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t u = 0; u < planes * strips; ++u) {
    const int64_t r0 = (u % strips) * RB, rows = std::min(RB, R - r0);
    const float* s = src + (u / strips) * R * C + r0 * C;
    float* d = dst + (u / strips) * R * C + r0;
    int64_t c0 = 0;
#if defined(TIEIFY_SHUFFLE)
    if (rows == RB)
      for (; c0 + 8 <= C; c0 += 8) {
        transpose8(s + c0, C, d + c0 * R, R);
        transpose8(s + 8 * C + c0, C, d + c0 * R + 8, R);
      }
#endif
    for (int64_t c = c0; c < C; ++c)  // the rest: a strip of fewer rows, the last columns
      for (int64_t r = 0; r < rows; ++r) d[c * R + r] = s[r * C + c];
  }
}

#endif  // part 0

}  // namespace tieify_kernel

#if !defined(TIEIFY_PART) || TIEIFY_PART == 0
using namespace tieify_kernel;

#define TIEIFY_API __attribute__((visibility("default")))

extern "C" {

// Bumped whenever the signature or the contract of an entry point changes.
TIEIFY_API int tieify_kernel_abi(void) { return 7; }

// Whether the build has OpenMP (threads > 1 run in parallel) and non-temporal stores.
TIEIFY_API int tieify_kernel_features(void) {
  int f = 0;
#if defined(_OPENMP)
  f |= 1;
#endif
#if defined(__AVX__)
  f |= 2;
#endif
  return f;
}

// C (R×N) = A (R×K) · Bt (K×N) + bias (N, or null); A and C row-major, Bt packed (see the top),
// all dense float32.
// Then, where given: C = C · scale[b] + shift[b] with b = row % blocks (scale and shift
// (blocks×N), both or neither), C += residual (R×N, may not alias C), C = max(C, 0) if relu.
// stream != 0 asks for non-temporal stores (used where C is 32-byte aligned and N % 8 == 0).
TIEIFY_API void tieify_pointwise(const float* A, const float* Bt, float* C, int64_t R, int64_t K,
                                 int64_t N, const float* bias, int threads, int stream,
                                 const float* scale, const float* shift, int64_t blocks,
                                 const float* residual, int relu) {
  product(nullptr, A, Bt, C, R, K, N, bias, threads, stream, scale, shift, blocks, residual,
          relu);
}

// dst[p][c][r] = src[p][r][c] for `planes` dense (R×C) matrices of src: a tensor's copy
// between NCHW (R channels, C pixels) and channels-last (R pixels, C channels); see transpose.
TIEIFY_API void tieify_transpose(const float* src, float* dst, int64_t planes, int64_t R,
                                 int64_t C, int threads) {
  transpose(src, dst, planes, R, C, threads);
}

// The pointwise product on channels-first tensors (run_planar): X (n, blocks·K, S) and
// Y (n, blocks·N, S) dense, S >= 16, Wp the bank packed by pack_planar() (tiles of 6 output
// channels, k-major, the last padded with zeros), bias (N, or null). stream != 0 asks for
// non-temporal stores, used where every strip is 64-byte aligned (Y too, S % 16 == 0). The
// epilogue's arguments are those of tieify_pointwise for one calling convention; none is
// taken (scale, shift, residual null, relu 0).
TIEIFY_API void tieify_pointwise_planar(const float* X, const float* Wp, float* Y, int64_t n,
                                        int64_t blocks, int64_t K, int64_t N, int64_t S,
                                        const float* bias, int threads, int stream,
                                        const float*, const float*, int64_t, const float*, int) {
  const bool aligned = reinterpret_cast<uintptr_t>(Y) % 64 == 0 && S % 16 == 0;
  if (stream && aligned)
    run_planar<true>(X, Wp, bias, Y, n * blocks, K, N, S, threads);
  else
    run_planar<false>(X, Wp, bias, Y, n * blocks, K, N, S, threads);
}

// The k×k tied convolution: X (n, h, w, blocks·K) channels-last, geometry = {n, h, w, blocks,
// K, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo}, Bt (kh·kw·K × N) packed: the bank with its taps
// outermost (weight.permute(2, 3, 1, 0)), C (n, ho, wo, blocks·N) channels-last, that is
// R = n·ho·wo·blocks rows of N; bias and the epilogue as for tieify_pointwise.
TIEIFY_API void tieify_conv(const float* X, const int64_t* geometry, const float* Bt, float* C,
                            int64_t N, const float* bias, int threads, int stream,
                            const float* scale, const float* shift, int64_t blocks,
                            const float* residual, int relu) {
  const int64_t* g = geometry;
  const Conv cv{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12],
                g[13], g[14]};
  const int64_t R = cv.n * cv.ho * cv.wo * cv.blocks;
  product(&cv, X, Bt, C, R, cv.kh * cv.kw * cv.K, N, bias, threads, stream, scale, shift,
          blocks, residual, relu);
}


// The 3×3 tied convolution with stride and dilation 1 by Winograd's F(2×2, 3×3)
// (run_winograd): the arguments of tieify_conv (geometry's kernel size, stride and dilation
// must be 3, 1 and 1), but Bt the 16 transformed banks packed by winograd_bank() in
// tieify/nn/_kernel.py (16·K·ldb floats), and the epilogue's blocks 0 or a divisor of the
// conv's. stream is not used: the output is written with regular stores.
TIEIFY_API void tieify_winograd(const float* X, const int64_t* geometry, const float* Bt, float* C,
                                int64_t N, const float* bias, int threads, int, const float* scale,
                                const float* shift, int64_t blocks, const float* residual,
                                int relu) {
  const int64_t* g = geometry;
  const Winograd w{g[0], g[1], g[2], g[3], g[4], N, g[9], g[10], g[13], g[14]};
  const int64_t CN = w.blocks * N;
  std::vector<float> a(CN, 1.f), b(CN, 0.f);  // y · a + b = (y + bias) · scale + shift
  const bool affine = scale && shift && blocks > 0;
  for (int64_t c = 0; c < CN; ++c) {
    const int64_t n = c % N, e = affine ? (c / N % blocks) * N + n : 0;
    if (affine) a[c] = scale[e];
    b[c] = (bias ? bias[n] * a[c] : 0.f) + (affine ? shift[e] : 0.f);
  }
  run_winograd(w, X, Bt, C, a.data(), b.data(), residual, relu != 0, threads);
}

}  // extern "C"
#endif  // part 0
