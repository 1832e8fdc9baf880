// tieify's CPU kernel for pointwise tied layers: C = A · Bt (+ bias).
//
// A is the (R, K) row-major matrix of every block of every pixel (R = N·H·W·B rows of
// K = C_in/B channels: a channels-last input, as is), Bt the (K, N) row-major transposed
// filter bank, C the (R, N) row-major output (channels-last again). K and N are small (the
// thin bank: 8-512) and R is huge, a shape BLAS libraries run far below their peak (their
// kernels are built for large K and N). Each register tile holds MR rows × 8·NV columns of C,
// a K-long loop broadcasts A and streams Bt from L1 (A prefetched ahead), and C is written
// once. Large outputs are written with non-temporal stores, which skip reading the
// output's cache lines from memory before overwriting them (on the AVX2 EPYC measured:
// stream / regular time 0.94-1.05 on ResNet-50's pointwise shapes on a quiet host; in one
// earlier run under load, not side by side, 1.2-1.8x faster on the 56x56 and 28x28 layers).
//
// Built by tieify/nn/_kernel.py with the machine's C++ compiler (-O3 -march=native, OpenMP
// where the compiler has it); GCC/Clang vector extensions, no intrinsics but the stream.

#include <cstdint>
#include <cstring>
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

// C[0:MR, 0:8·NV] = A[0:MR, :] · Bt[:, 0:8·NV] (+ bias[0:8·NV]).
template <int MR, int NV, bool STREAM>
inline void tile(const float* __restrict a, int64_t lda, const float* __restrict bt, int64_t ldb,
                 float* __restrict c, int64_t ldc, int64_t K, const float* __restrict bias) {
  v8 acc[MR][NV];
  for (int j = 0; j < NV; ++j) {
    const v8 b0 = bias ? load8(bias + 8 * j) : v8{};
    for (int i = 0; i < MR; ++i) acc[i][j] = b0;
  }
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 15) == 0)  // each row's next cache line, PREFETCH_TILES row tiles ahead
      for (int i = 0; i < MR; ++i) __builtin_prefetch(a + (PREFETCH_TILES * MR + i) * lda + k);
    v8 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = load8(bt + k * ldb + 8 * j);
    for (int i = 0; i < MR; ++i) {
      const float s = a[i * lda + k];
      const v8 av = {s, s, s, s, s, s, s, s};
      for (int j = 0; j < NV; ++j) acc[i][j] += av * b[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) store8<STREAM>(c + i * ldc + 8 * j, acc[i][j]);
}

// Columns [n0, N) of `rows` rows, fewer than 8 of them: plain scalar code.
inline void tail_columns(const float* a, const float* bt, float* c, int64_t rows, int64_t K,
                         int64_t N, int64_t n0, const float* bias) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t n = n0; n < N; ++n) {
      float s = bias ? bias[n] : 0.f;
      for (int64_t k = 0; k < K; ++k) s += a[i * K + k] * bt[k * N + n];
      c[i * N + n] = s;
    }
}

// All columns of MR rows (tiles of 16, then 8, then the scalar tail).
template <int MR, bool STREAM>
inline void row_block(const float* a, const float* bt, float* c, int64_t K, int64_t N,
                      const float* bias) {
  int64_t n0 = 0;
  for (; n0 + 16 <= N; n0 += 16)
    tile<MR, 2, STREAM>(a, K, bt + n0, N, c + n0, N, K, bias ? bias + n0 : nullptr);
  for (; n0 + 8 <= N; n0 += 8)
    tile<MR, 1, STREAM>(a, K, bt + n0, N, c + n0, N, K, bias ? bias + n0 : nullptr);
  if (n0 < N) tail_columns(a, bt, c, MR, K, N, n0, bias);
}

template <bool STREAM>
void run(const float* A, const float* Bt, float* C, int64_t R, int64_t K, int64_t N,
         const float* bias, int threads) {
  constexpr int MR = 6;
  const int64_t blocks = R / MR;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < blocks; ++t)
      row_block<MR, STREAM>(A + t * MR * K, Bt, C + t * MR * N, K, N, bias);
#if defined(__AVX__)
    if (STREAM) _mm_sfence();  // streamed stores visible before the threads join
#endif
  }
  for (int64_t r = blocks * MR; r < R; ++r)
    row_block<1, false>(A + r * K, Bt, C + r * N, K, N, bias);
}

}  // namespace

extern "C" {

// Bumped whenever the signature or the contract of tieify_pointwise changes.
int tieify_kernel_abi(void) { return 1; }

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
// stream != 0 asks for non-temporal stores (used where C is 32-byte aligned and N % 8 == 0).
void tieify_pointwise(const float* A, const float* Bt, float* C, int64_t R, int64_t K,
                      int64_t N, const float* bias, int threads, int stream) {
  const bool aligned = (reinterpret_cast<uintptr_t>(C) % 32 == 0) && (N % 8 == 0);
  if (stream && aligned)
    run<true>(A, Bt, C, R, K, N, bias, threads);
  else
    run<false>(A, Bt, C, R, K, N, bias, threads);
}

}  // extern "C"
