// Kernels for decoding on x86 CPUs with AVX2 (see ember/gemv.py for who calls them and when).
//
// Decoding multiplies one activation row (or a few) by every weight matrix, so its speed is
// how fast the weights stream from memory. This file reads each weight row once, as one
// sequential stream with a software prefetch ahead of it, widens it to fp32 in registers
// (bf16: a shift or a mask, no shuffle; fp16: F16C) and accumulates in fp32 with four
// independent FMA chains. int8 weights instead meet the activation row rounded to int16, in
// integer multiply-adds (rows_dot_i8), and so do group-wise int4 weights, for one row or a
// few (rows_dot_i4). Rows are split across PyTorch's intra-op threads. The same step's
// attention, one query against the cache, has its own kernel (decode_attention_head).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// How far ahead of the row being multiplied a thread asks for weights: far enough to keep
// several cache misses in flight per thread (chosen on benchmarks/quant.py's decode rows).
constexpr int64_t kPrefetchBytes = 4096;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// Eight weights, widened to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const int8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

// Sixteen bf16 weights as two fp32 vectors with no shuffle: in each 32-bit lane the even
// element is the low half (shift it up) and the odd one the high half (mask the low half off).
// The activations they multiply are stored in the same even/odd order (see even_odd_order).
inline void load16_even_odd(const at::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// y[n] = scale[n] * sum_k w[n, k] x[k] for rows [n0, n1); K is a multiple of 8. `xp` is x in
// even/odd order per block of 16 (used for bf16 weights, whose widening it makes cheaper).
template <typename T>
void rows_dot(const T* w, const float* x, const float* xp, const float* scale, float* y, int64_t K, int64_t n0,
              int64_t n1) {
  constexpr int64_t kPrefetch = kPrefetchBytes / sizeof(T);  // elements ahead
  for (int64_t n = n0; n < n1; ++n) {
    const T* row = w + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetch) + 64, _MM_HINT_T0);
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        __m256 e0, o0, e1, o1;
        load16_even_odd(row + k, e0, o0);
        load16_even_odd(row + k + 16, e1, o1);
        a0 = _mm256_fmadd_ps(e0, _mm256_loadu_ps(xp + k), a0);
        a1 = _mm256_fmadd_ps(o0, _mm256_loadu_ps(xp + k + 8), a1);
        a2 = _mm256_fmadd_ps(e1, _mm256_loadu_ps(xp + k + 16), a2);
        a3 = _mm256_fmadd_ps(o1, _mm256_loadu_ps(xp + k + 24), a3);
      } else {
        a0 = _mm256_fmadd_ps(load8(row + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8(row + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(row + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(row + k + 24), _mm256_loadu_ps(x + k + 24), a3);
      }
    }
    for (; k < K; k += 8) a0 = _mm256_fmadd_ps(load8(row + k), _mm256_loadu_ps(x + k), a0);
    float s = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    y[n] = scale ? s * scale[n] : s;
  }
}

// Calls f(std::integral_constant<int, M>()) with M = m (1 to 8): the row count as a compile-time
// constant, so that the per-row accumulators of the few-row kernels stay in registers.
template <typename F>
inline void with_row_count(int m, F&& f) {
  switch (m) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

// One weight row against M activation rows (M <= 8, row-major in x; for bf16 weights each row in
// even/odd order, as for one row): out[m] = row . x[m]. Each weight vector is loaded and widened
// once and multiplies all M rows; M independent accumulators keep the FMA units busy.
template <typename T, int M>
inline void row_dot_few(const T* row, const float* x, int64_t K, float* out) {
  constexpr int64_t kPrefetch = kPrefetchBytes / sizeof(T);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetch), _MM_HINT_T0);
    __m256 w0, w1;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      load16_even_odd(row + k, w0, w1);  // x is then in even/odd order (see even_odd_order)
    } else {
      w0 = load8(row + k);
      w1 = load8(row + k + 8);
    }
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m]);
      acc[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m]);
    }
  }
  if (k < K) {  // K % 16 == 8
    const __m256 w0 = load8(row + k);
    for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m]);
  }
  for (int m = 0; m < M; ++m) out[m] = horizontal_sum(acc[m]);
}

// Weight rows [n0, n1) times `rows` activation rows (a speculative step's verification, a small
// batch's decode), eight at a time: each weight row streams from memory once, and is read again
// from L1 for every further group of eight, so a few rows cost about one row's memory traffic.
template <typename T>
void rows_dot_few(const T* w, const float* x, const float* scale, float* y, int64_t rows, int64_t N, int64_t K,
                  int64_t n0, int64_t n1) {
  float out[8];
  for (int64_t n = n0; n < n1; ++n) {
    const T* row = w + n * K;
    const float s = scale ? scale[n] : 1.f;
    for (int64_t c = 0; c < rows; c += 8) {
      const float* xc = x + c * K;
      const int m = static_cast<int>(std::min<int64_t>(8, rows - c));
      with_row_count(m, [&](auto M) { row_dot_few<T, decltype(M)::value>(row, xc, K, out); });
      for (int i = 0; i < m; ++i) y[(c + i) * N + n] = out[i] * s;
    }
  }
}

// int8 weights: the activation row is rounded once to int16 (15 bits of precision against its
// largest element, finer than bf16's 8), so a weight-by-activation product is an integer
// multiply-add. Each 32-bit lane of a 32-byte load holds two 16-bit pairs of weights; shifts
// split them into even and odd bytes, sign-extended, with no shuffle; `vpmaddwd` multiplies
// 16 pairs and adds neighbours. The activations are stored in the matching order (xqp).
// Integer sums are moved to fp32 every kChunk weights, before they could overflow.
void rows_dot_i8(const int8_t* w, const int16_t* xq, const int16_t* xqp, float xscale, const float* scale,
                 float* y, int64_t K, int64_t n0, int64_t n1) {
  constexpr int64_t kPrefetch = kPrefetchBytes, kChunk = 8192;
  const int64_t K32 = K - K % 32;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    __m256 total = _mm256_setzero_ps();
    int64_t k = 0;
    while (k < K32) {
      const int64_t end = std::min(k + kChunk, K32);
      __m256i ae = _mm256_setzero_si256(), ao = ae;
      for (; k < end; k += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetch), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
        const __m256i even = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
        const __m256i odd = _mm256_srai_epi16(v, 8);
        ae = _mm256_add_epi32(ae, _mm256_madd_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xqp + k))));
        ao = _mm256_add_epi32(ao, _mm256_madd_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xqp + k + 16))));
      }
      total = _mm256_add_ps(total, _mm256_add_ps(_mm256_cvtepi32_ps(ae), _mm256_cvtepi32_ps(ao)));
    }
    int32_t tail = 0;
    for (; k < K; ++k) tail += static_cast<int32_t>(row[k]) * xq[k];
    const float s = (horizontal_sum(total) + static_cast<float>(tail)) * xscale;
    y[n] = scale ? s * scale[n] : s;
  }
}

// The same product on CPUs with AVX-512 VNNI (Intel since Ice Lake, AMD since Zen 4), chosen at
// run time: 64 weights a load, and `vpdpwssd` multiplies 32 int16 pairs, adds neighbours and
// accumulates in one instruction, where AVX2 needs a multiply-add and an add for half as many.
// xqp holds the activations even/odd per block of 64; K % 64 == 0. Over a chunk of 8192 weights
// a lane of ae + ao sums 256 products of at most 127 * 16383: inside int32.
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void rows_dot_i8_vnni(const int8_t* w, const int16_t* xqp, float xscale, const float* scale, float* y, int64_t K,
                      int64_t n0, int64_t n1) {
  constexpr int64_t kPrefetch = kPrefetchBytes, kChunk = 8192;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    __m512 total = _mm512_setzero_ps();
    for (int64_t k = 0; k < K;) {
      const int64_t end = std::min(k + kChunk, K);
      __m512i ae = _mm512_setzero_si512(), ao = ae;
      for (; k < end; k += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetch), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(row + k);
        ae = _mm512_dpwssd_epi32(ae, _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8), _mm512_loadu_si512(xqp + k));
        ao = _mm512_dpwssd_epi32(ao, _mm512_srai_epi16(v, 8), _mm512_loadu_si512(xqp + k + 32));
      }
      total = _mm512_add_ps(total, _mm512_cvtepi32_ps(_mm512_add_epi32(ae, ao)));
    }
    const float s = _mm512_reduce_add_ps(total) * xscale;
    y[n] = scale ? s * scale[n] : s;
  }
}

// Whether this CPU has AVX-512 VNNI (and the OS keeps its registers); EMBER_GEMV_AVX512=0 turns
// the AVX-512 paths off, to compare them with the AVX2 ones.
bool has_avx512_vnni() {
  static const bool yes = [] {
    const char* env = std::getenv("EMBER_GEMV_AVX512");
    if (env && std::string(env) == "0") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
  }();
  return yes;
}

// int8 weights times M activation rows (M <= 8; each rounded to int16 with its own step, in the
// even/odd order of rows_dot_i8): the weights are split into even and odd bytes once per load and
// meet every row's activations, each row's integer sum moved to fp32 every kChunk weights.
template <int M>
inline void row_dot_i8_few(const int8_t* row, const int16_t* xqp, const int16_t* xq, const float* xscale, int64_t K,
                           float* out) {
  constexpr int64_t kChunk = 8192;
  const int64_t K32 = K - K % 32;
  __m256 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm256_setzero_ps();
  int64_t k = 0;
  while (k < K32) {
    const int64_t end = std::min(k + kChunk, K32);
    __m256i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_si256();
    for (; k < end; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k + 2048), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
      const __m256i even = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
      const __m256i odd = _mm256_srai_epi16(v, 8);
      for (int m = 0; m < M; ++m) {
        const int16_t* xm = xqp + m * K + k;
        acc[m] = _mm256_add_epi32(acc[m], _mm256_add_epi32(
            _mm256_madd_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm))),
            _mm256_madd_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + 16)))));
      }
    }
    for (int m = 0; m < M; ++m) total[m] = _mm256_add_ps(total[m], _mm256_cvtepi32_ps(acc[m]));
  }
  for (int m = 0; m < M; ++m) {
    int32_t tail = 0;
    for (int64_t t = K32; t < K; ++t) tail += static_cast<int32_t>(row[t]) * xq[m * K + t];
    out[m] = (horizontal_sum(total[m]) + static_cast<float>(tail)) * xscale[m];
  }
}

// The few-row product with AVX-512 VNNI (see rows_dot_i8_vnni; activations even/odd per 64).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void row_dot_i8_few_vnni(const int8_t* row, const int16_t* xqp, const float* xscale, int64_t K, float* out) {
  constexpr int64_t kChunk = 8192;
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K;) {
    const int64_t end = std::min(k + kChunk, K);
    __m512i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
    for (; k < end; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetchBytes), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(row + k);
      const __m512i even = _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8);
      const __m512i odd = _mm512_srai_epi16(v, 8);
      for (int m = 0; m < M; ++m) {
        const int16_t* xm = xqp + m * K + k;
        acc[m] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(acc[m], even, _mm512_loadu_si512(xm)), odd,
                                     _mm512_loadu_si512(xm + 32));
      }
    }
    for (int m = 0; m < M; ++m) total[m] = _mm512_add_ps(total[m], _mm512_cvtepi32_ps(acc[m]));
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(total[m]) * xscale[m];
}

// int8 weight rows [n0, n1) times `rows` activation rows, eight at a time (see rows_dot_few), through
// the AVX-512 VNNI kernel when `vnni` (activations then even/odd per 64, K % 64 == 0).
void rows_dot_i8_few(const int8_t* w, const int16_t* xqp, const int16_t* xq, const float* xscale, const float* scale,
                     float* y, int64_t rows, int64_t N, int64_t K, int64_t n0, int64_t n1, bool vnni) {
  float out[8];
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    const float s = scale ? scale[n] : 1.f;
    for (int64_t c = 0; c < rows; c += 8) {
      const int16_t *p = xqp + c * K, *q = xq + c * K;
      const float* xs = xscale + c;
      const int m = static_cast<int>(std::min<int64_t>(8, rows - c));
      with_row_count(m, [&](auto M) {
        if (vnni) row_dot_i8_few_vnni<decltype(M)::value>(row, p, xs, K, out);
        else row_dot_i8_few<decltype(M)::value>(row, p, q, xs, K, out);
      });
      for (int i = 0; i < m; ++i) y[(c + i) * N + n] = out[i] * s;
    }
  }
}

// int8 weights with a scale per group of columns (llama.cpp's Q8_0: one fp16 scale per 32):
// scale [N, G] in fp32 or fp16, `shift` = log2 of the group (a power of two, at least 32).
// sum_k w_k x_k = sum_g s_g sum_{k in g} q_k x_k: the integer sum of each 32 columns (AVX2) or
// 64 (AVX-512, two groups of 32 in the two 256-bit halves) is moved to fp32 and multiplied by
// its group's scale, so no integer sum spans more than one group.
struct GroupScales {
  const float* f = nullptr;        // fp32 scales, or
  const uint16_t* h = nullptr;     // fp16 scales (their bits)
  int64_t G = 0, shift = 5;
  inline float get(int64_t n, int64_t k) const {  // the scale of row n's column k
    const int64_t i = n * G + (k >> shift);
    return f ? f[i] : _cvtsh_ss(h[i]);
  }
};

// 32 int8 weights against 32 int16 activations in rows_dot_i8's even/odd order: 8 int32 sums.
inline __m256i block_dot_i8(const __m256i v, const int16_t* xp) {
  const __m256i even = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8), odd = _mm256_srai_epi16(v, 8);
  return _mm256_add_epi32(_mm256_madd_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp))),
                          _mm256_madd_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 16))));
}

// Grouped int8 weight row n against M activation rows (M <= 8; xqp even/odd per 32, K % 32 == 0):
// out[m] = row . x[m], before the activation rows' steps.
template <int M>
inline void row_dot_i8_grouped(const int8_t* row, int64_t n, const int16_t* xqp, const GroupScales& sc, int64_t K,
                               float* out) {
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetchBytes), _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
    const __m256 s = _mm256_set1_ps(sc.get(n, k));
    for (int m = 0; m < M; ++m)
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_i8(v, xqp + m * K + k)), s, acc[m]);
  }
  for (int m = 0; m < M; ++m) out[m] = horizontal_sum(acc[m]);
}

// The same with AVX-512 VNNI (xqp even/odd per 64, K % 64 == 0): the 32-bit lanes 0-7 of a
// 64-column product hold columns k..k+31 and lanes 8-15 columns k+32..k+63, so a blend of the two
// groups' scales multiplies each half by its own.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void row_dot_i8_grouped_vnni(const int8_t* row, int64_t n, const int16_t* xqp, const GroupScales& sc, int64_t K,
                             float* out) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetchBytes), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(row + k);
    const __m512i even = _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8), odd = _mm512_srai_epi16(v, 8);
    const __m512 s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sc.get(n, k)), _mm512_set1_ps(sc.get(n, k + 32)));
    for (int m = 0; m < M; ++m) {
      const int16_t* xm = xqp + m * K + k;
      const __m512i p = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(xm)),
                                            odd, _mm512_loadu_si512(xm + 32));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
}

// Grouped int8 weight rows [n0, n1) times `rows` activation rows, eight at a time (see
// rows_dot_few: each weight row streams from memory once), through the VNNI kernel when `vnni`.
void rows_dot_i8_grouped(const int8_t* w, const int16_t* xqp, const float* xscale, const GroupScales& sc, float* y,
                         int64_t rows, int64_t N, int64_t K, int64_t n0, int64_t n1, bool vnni) {
  float out[8];
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    for (int64_t c = 0; c < rows; c += 8) {
      const int m = static_cast<int>(std::min<int64_t>(8, rows - c));
      with_row_count(m, [&](auto R) {
        constexpr int kRows = decltype(R)::value;
        if (vnni) row_dot_i8_grouped_vnni<kRows>(row, n, xqp + c * K, sc, K, out);
        else row_dot_i8_grouped<kRows>(row, n, xqp + c * K, sc, K, out);
      });
      for (int i = 0; i < m; ++i) y[(c + i) * N + n] = out[i] * xscale[c + i];
    }
  }
}

// int4 weights, group-wise asymmetric (ember/quant/int4.py): w = (q - 8) s + z over each group
// of `group` columns, q in 0..15 packed two to a byte (column 2j in the low nibble, 2j + 1 in
// the high one). So sum_k w_k x_k = sum_g [s_g sum_{k in g} q_k x_k + (z_g - 8 s_g) X_g] with
// X_g = sum_{k in g} x_k: integer multiply-adds inside a group (x rounded to int16 as for int8),
// one fp32 multiply-add per group. A 32-byte load holds 64 columns' nibbles; a mask and shifts
// turn them into four vectors of 16 int16 values, with no shuffle: columns c + 4i and c + 4i + 2
// (low nibbles of even and odd bytes), c + 4i + 1 and c + 4i + 3 (high nibbles). The activations
// are stored in that order (int4_order). The lower 128-bit half of every product vector holds
// columns c..c+31 and the upper half c+32..c+63, which is how a group of 32 gets its own scale.
inline __m256i block_dot_i4(const uint8_t* p, const int16_t* xqp) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i nib = _mm256_set1_epi8(0x0F), low_byte = _mm256_set1_epi16(0x00FF);
  const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
  auto x = [&](int i) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xqp + 16 * i)); };
  const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(lo, low_byte), x(0)),
                                     _mm256_madd_epi16(_mm256_srli_epi16(lo, 8), x(1)));
  const __m256i b = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(hi, low_byte), x(2)),
                                     _mm256_madd_epi16(_mm256_srli_epi16(hi, 8), x(3)));
  return _mm256_add_epi32(a, b);
}

// int4 scales and offsets come as fp32, or as fp16 bits (a GGUF file's own block scales, read at
// half the bytes); either way they are used as fp32.
inline float as_float(float v) { return v; }
inline float as_float(uint16_t bits) { return _cvtsh_ss(bits); }

// A row's zero-point term, sum_g (z_g - 8 s_g) X_g (see above), shared by both int4 kernels.
template <typename S>
inline float zero_points(const S* offset, const float* xsum, int64_t G) {
  float total = 0.f;
  for (int64_t g = 0; g < G; ++g) total += as_float(offset[g]) * xsum[g];
  return total;
}

// y[m, n] for rows [n0, n1) of w and every activation row m (M of them): each weight row is
// read from memory once and from L1 for the other M - 1 activation rows. scale and offset are
// [N, G] (s and z - 8 s); xqp [M, K] in int4_order, xsum [M, G], xscale [M].
template <typename S>
void rows_dot_i4(const uint8_t* w, const int16_t* xqp, const float* xsum, const float* xscale,
                 const S* scale, const S* offset, float* y, int64_t M, int64_t N, int64_t K,
                 int64_t group, int64_t n0, int64_t n1) {
  constexpr int64_t kPrefetch = kPrefetchBytes;
  const int64_t G = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * (K / 2);
    const S* s = scale + n * G;
    const S* off = offset + n * G;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* xm = xqp + m * K;
      __m256 acc = _mm256_setzero_ps();
      if (group == 32) {  // two groups per 64-column block: one scale per 128-bit half
        for (int64_t c = 0; c < K; c += 64) {
          if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(row + c / 2 + kPrefetch), _MM_HINT_T0);
          const __m256 sv = _mm256_set_m128(_mm_set1_ps(as_float(s[c / 32 + 1])), _mm_set1_ps(as_float(s[c / 32])));
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_i4(row + c / 2, xm + c)), sv, acc);
        }
      } else {  // group is a multiple of 64
        for (int64_t g = 0; g < G; ++g) {
          __m256i ai = _mm256_setzero_si256();
          for (int64_t c = g * group; c < (g + 1) * group; c += 64) {
            if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(row + c / 2 + kPrefetch), _MM_HINT_T0);
            ai = _mm256_add_epi32(ai, block_dot_i4(row + c / 2, xm + c));
          }
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), _mm256_set1_ps(as_float(s[g])), acc);
        }
      }
      y[m * N + n] = horizontal_sum(acc) * xscale[m] + zero_points(off, xsum + m * G, G);
    }
  }
}


// int4 with AVX-512 VNNI, for groups of a multiple of 128 columns: a 64-byte load holds two
// 64-column blocks, split into nibbles exactly as in block_dot_i4 (the shifts and masks act on
// each 16-bit element alike), and `vpdpwssd` multiplies, adds pairs and accumulates in one
// instruction. xq is int4_order with each 128 columns interleaved to match: the first 16-value
// chunk of both blocks, then the second of both, and so on (int4_order_512).
template <typename S>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void rows_dot_i4_vnni(const uint8_t* w, const int16_t* xq, const float* xsum, const float* xscale,
                      const S* scale, const S* offset, float* y, int64_t M, int64_t N, int64_t K,
                      int64_t group, int64_t n0, int64_t n1) {
  constexpr int64_t kPrefetch = kPrefetchBytes;
  const int64_t G = K / group;
  const __m512i nib = _mm512_set1_epi8(0x0F), low_byte = _mm512_set1_epi16(0x00FF);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * (K / 2);
    const S* s = scale + n * G;
    const S* off = offset + n * G;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* xm = xq + m * K;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;  // four independent chains
        for (int64_t c = g * group; c < (g + 1) * group; c += 128) {
          if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(row + c / 2 + kPrefetch), _MM_HINT_T0);
          const __m512i v = _mm512_loadu_si512(row + c / 2);
          const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
          const int16_t* xc = xm + c;
          a0 = _mm512_dpwssd_epi32(a0, _mm512_and_si512(lo, low_byte), _mm512_loadu_si512(xc));
          a1 = _mm512_dpwssd_epi32(a1, _mm512_srli_epi16(lo, 8), _mm512_loadu_si512(xc + 32));
          a2 = _mm512_dpwssd_epi32(a2, _mm512_and_si512(hi, low_byte), _mm512_loadu_si512(xc + 64));
          a3 = _mm512_dpwssd_epi32(a3, _mm512_srli_epi16(hi, 8), _mm512_loadu_si512(xc + 96));
        }
        const __m512i ai = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai), _mm512_set1_ps(as_float(s[g])), acc);
      }
      y[m * N + n] = _mm512_reduce_add_ps(acc) * xscale[m] + zero_points(off, xsum + m * G, G);
    }
  }
}

// int4_order for rows_dot_i4_vnni: per 128 columns, chunk i (16 values) of the first 64-column
// block, then chunk i of the second, for i = 0..3.
void int4_order_512(const int16_t* xo, int64_t K, int16_t* out) {
  for (int64_t c = 0; c < K; c += 128)
    for (int i = 0; i < 4; ++i)
      for (int b = 0; b < 2; ++b)
        std::copy(xo + c + 64 * b + 16 * i, xo + c + 64 * b + 16 * i + 16, out + c + 32 * i + 16 * b);
}

// exp of eight floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^6
// (relative error below 2e-7), 2^n built in the exponent bits. Inputs below -87 give ~1e-38.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
}

// One decoding query per sequence against its cached keys and values (grouped-query attention):
// each KV head's keys and values are read once for all the query heads it serves, and the
// softmax runs in fp32 over the visible positions only. PyTorch's kernel for this shape spends
// most of its time outside the arithmetic (widening the whole cache to fp32, blocking for long
// queries). For one sequence and one KV head: q [G, D] (its query heads), k and v [T, D] rows
// (strides given), visible [T] (1 = attend), out [G, D]; D a multiple of 8, at most 256.
template <typename T>
void decode_attention_head(const T* q, const T* k, const T* v, int64_t k_stride, int64_t v_stride,
                           const uint8_t* visible, float* out, int64_t G, int64_t Tk, int64_t D, float scale,
                           std::vector<float>& scores, const int64_t* offsets = nullptr) {
  // Position t's key row is at k + offsets[t] (a paged cache: wherever its slot lies), else k + t * k_stride.
  float qf[8][256];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qf[g][d] = static_cast<float>(q[g * D + d]) * scale;
  scores.resize(G * Tk);
  std::fill(scores.begin(), scores.end(), -INFINITY);
  float mx[8];
  std::fill(mx, mx + G, -INFINITY);
  for (int64_t t = 0; t < Tk; ++t) {
    if (!visible[t]) continue;
    const T* kr = k + (offsets ? offsets[t] : t * k_stride);
    __m256 acc[8];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 kv = load8(kr + d);
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qf[g] + d), acc[g]);
    }
    for (int64_t g = 0; g < G; ++g) {
      const float sc = horizontal_sum(acc[g]);
      scores[g * Tk + t] = sc;
      mx[g] = std::max(mx[g], sc);
    }
  }
  float total[8] = {0.f};
  for (int64_t g = 0; g < G; ++g) {  // hidden positions hold -inf: exp gives (next to) nothing
    float* sg = scores.data() + g * Tk;
    __m256 sum = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= Tk; t += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + t), _mm256_set1_ps(mx[g])));
      _mm256_storeu_ps(sg + t, e);
      sum = _mm256_add_ps(sum, e);
    }
    total[g] = horizontal_sum(sum);
    for (; t < Tk; ++t) {
      sg[t] = visible[t] ? std::exp(sg[t] - mx[g]) : 0.f;
      total[g] += sg[t];
    }
  }
  __m256 o[8][4];  // up to 8 query heads x 32 of D at a time
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    const int64_t nd = std::min<int64_t>(32, D - d0) / 8;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < nd; ++j) o[g][j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < Tk; ++t) {
      if (!visible[t]) continue;
      const T* vr = v + (offsets ? offsets[t] : t * v_stride) + d0;
      for (int64_t j = 0; j < nd; ++j) {
        const __m256 vv = load8(vr + 8 * j);
        for (int64_t g = 0; g < G; ++g) o[g][j] = _mm256_fmadd_ps(_mm256_set1_ps(scores[g * Tk + t]), vv, o[g][j]);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const __m256 inv = _mm256_set1_ps(total[g] > 0.f ? 1.f / total[g] : 0.f);
      for (int64_t j = 0; j < nd; ++j) _mm256_storeu_ps(out + g * D + d0 + 8 * j, _mm256_mul_ps(o[g][j], inv));
    }
  }
}

}  // namespace

// x in the order the even/odd loads produce: per block of `block` elements, the even ones,
// then the odd ones (bf16: blocks of 16 floats; int8: blocks of 32 int16).
template <typename T>
std::vector<T> even_odd_order(const std::vector<T>& x, size_t block) {
  std::vector<T> xp(x);
  for (size_t b = 0; b + block <= x.size(); b += block)
    for (size_t i = 0; i < block / 2; ++i) {
      xp[b + i] = x[b + 2 * i];
      xp[b + block / 2 + i] = x[b + 2 * i + 1];
    }
  return xp;
}

// Round an activation row to int16 against its largest magnitude; returns the step. 16383
// keeps a pair's sum of products (2 * 127 * 16383) and 8192 / 32 of them inside int32.
float round_row_int16(const float* x, int64_t K, int16_t* xq) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(x[k]));
  const float step = amax > 0.f ? amax / 16383.f : 1.f;
  for (int64_t k = 0; k < K; ++k) xq[k] = static_cast<int16_t>(std::nearbyint(x[k] / step));
  return step;
}

// The order block_dot_i4 reads a 64-column block in: columns 4i, then 4i + 2, 4i + 1, 4i + 3.
void int4_order(const int16_t* xq, int64_t K, int16_t* out) {
  for (int64_t c = 0; c < K; c += 64)
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 16; ++i) out[c + 16 * j + i] = xq[c + 4 * i + (j == 1 ? 2 : j == 2 ? 1 : j)];
}

// One contiguous slice of rows per thread: each thread reads one long sequential stream.
template <typename F>
void split_rows(int64_t N, F&& rows) {
  const int threads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(N / 64)));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; ++t) rows(N * t / threads, N * (t + 1) / threads);
}

// fp32 copy of x's elements (the activation rows: small, and read from cache).
std::vector<float> float_copy(const torch::Tensor& x) {
  std::vector<float> xf(x.numel());
  torch::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "float_copy", [&] {
    const scalar_t* p = xc.data_ptr<scalar_t>();
    for (size_t i = 0; i < xf.size(); ++i) xf[i] = static_cast<float>(p[i]);
  });
  return xf;
}

// The products y [M, N] (fp32; N the stacked matrices' rows) plus each matrix's bias at its
// columns, as x's leading shape with N last, in x's dtype.
torch::Tensor output_rows(const torch::Tensor& x, const std::vector<int64_t>& start, std::vector<float>& y,
                          const std::vector<c10::optional<torch::Tensor>>& biases) {
  const int64_t N = start.back(), M = static_cast<int64_t>(y.size()) / N;
  for (size_t i = 0; i < biases.size(); ++i) {
    if (!biases[i].has_value()) continue;
    torch::Tensor b = biases[i]->to(torch::kFloat).contiguous();
    const float* bp = b.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < start[i + 1] - start[i]; ++n) y[m * N + start[i] + n] += bp[n];
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  torch::Tensor out = torch::empty(shape, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "output_rows", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (size_t i = 0; i < y.size(); ++i) o[i] = static_cast<scalar_t>(y[i]);
  });
  return out;
}

// Several weight matrices that multiply the same activations (q, k and v; gate and up) are
// one job: the activations are prepared once, and the threads split the rows of all of them
// stacked, so one parallel region serves what would otherwise be one per matrix. The outputs
// sit side by side in one [..., sum of N_i] tensor (the caller splits it into views): an op
// that returned a list would be called through Python from a compiled graph.
struct Stack {
  std::vector<int64_t> start;  // start[i]: matrix i's first row in the stack; start.back(): all rows
  explicit Stack(const std::vector<torch::Tensor>& ws) : start{0} {
    for (const auto& w : ws) start.push_back(start.back() + w.size(0));
  }
  // The stack's rows split over the threads: f(i, a, b) for each matrix i and its rows [a, b)
  // in a thread's share.
  template <typename F>
  void split(F&& f) const {
    split_rows(start.back(), [&](int64_t n0, int64_t n1) {
      for (size_t i = 0; i + 1 < start.size(); ++i) {
        const int64_t a = std::max(n0, start[i]), b = std::min(n1, start[i + 1]);
        if (a < b) f(i, a - start[i], b - start[i]);
      }
    });
  }
};

// x [..., K] times each of ws [N_i, K] (all contiguous, one dtype: fp32, bf16, fp16 or int8),
// scales[i] [N_i] or None (per-row factors of int8 weights) or, for int8 weights, [N_i, G] fp32
// or fp16 (a factor per group of K / G columns, a power of two from 32), biases[i] [N_i] or None. x holds
// one row, or up to 16 (each weight row is then read once for all of them). Returns
// [..., sum of N_i] in x's dtype: matrix i's products at columns start[i]..start[i + 1].
torch::Tensor gemv_many(const torch::Tensor& x, const std::vector<torch::Tensor>& ws,
                        const std::vector<c10::optional<torch::Tensor>>& scales,
                        const std::vector<c10::optional<torch::Tensor>>& biases) {
  TORCH_CHECK(!ws.empty() && scales.size() == ws.size() && biases.size() == ws.size(),
              "gemv: one scale and one bias (or None) per weight");
  const int64_t K = ws[0].dim() == 2 ? ws[0].size(1) : 0, M = K ? x.numel() / K : 0;
  for (const auto& w : ws)
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == K && K % 8 == 0 &&
                w.scalar_type() == ws[0].scalar_type(), "gemv: weights must be [N, K] contiguous, K % 8 == 0, "
                "one dtype and one K");
  TORCH_CHECK(x.size(-1) == K && M >= 1, "gemv: x must hold rows of ", K, " columns, got shape ", x.sizes());
  const Stack stack(ws);
  const size_t count = ws.size();
  // fp32 copies of the activation rows and the per-row factors: small, and read from cache.
  std::vector<float> xf = float_copy(x);
  const int64_t N = stack.start.back();  // the output's row stride
  std::vector<float> yf(M * N);
  std::vector<torch::Tensor> sf(count);  // fp32 per-row factors (the scales themselves when fp32)
  std::vector<const float*> sp(count, nullptr);
  // int8 weights with a scale per group of columns: every scale [N_i, G], the same G for all.
  const bool grouped = scales[0].has_value() && scales[0]->dim() == 2;
  std::vector<GroupScales> gs(count);
  if (grouped) {
    const int64_t G = scales[0]->size(1), group = G ? K / G : 0;
    TORCH_CHECK(ws[0].scalar_type() == at::kChar && group >= 32 && (group & (group - 1)) == 0 && group * G == K,
                "gemv: group-wise scales [N, G] are for int8 weights, with K / G a power of two of at least 32");
    for (size_t i = 0; i < count; ++i) {
      TORCH_CHECK(scales[i].has_value() && scales[i]->dim() == 2 && scales[i]->size(0) == ws[i].size(0) &&
                  scales[i]->size(1) == G && scales[i]->is_contiguous() &&
                  (scales[i]->scalar_type() == at::kFloat || scales[i]->scalar_type() == at::kHalf),
                  "gemv: every group-wise scale must be contiguous fp32 or fp16 [N, ", G, "]");
      gs[i].G = G;
      gs[i].shift = __builtin_ctzll(static_cast<unsigned long long>(group));
      if (scales[i]->scalar_type() == at::kFloat) gs[i].f = scales[i]->data_ptr<float>();
      else gs[i].h = reinterpret_cast<const uint16_t*>(scales[i]->data_ptr<at::Half>());
    }
  }
  for (size_t i = 0; i < count && !grouped; ++i) {
    if (scales[i].has_value()) {
      sf[i] = scales[i]->to(torch::kFloat).contiguous();
      sp[i] = sf[i].data_ptr<float>();
    }
  }
  // Matrix i's rows [a, b) through `f(weights, scale, out, a, b)`, out being the matrix's first
  // output column (rows of N).
  auto over_stack = [&](auto tag, auto&& f) {
    using T = decltype(tag);
    stack.split([&](size_t i, int64_t a, int64_t b) {
      f(ws[i].data_ptr<T>(), sp[i], yf.data() + stack.start[i], a, b);
    });
  };
  const auto dtype = ws[0].scalar_type();
  if (dtype == at::kChar) {
    const bool vnni = K % 64 == 0 && has_avx512_vnni();
    std::vector<int16_t> xq(M * K), xqp(M * K);
    std::vector<float> xscale(M);
    for (int64_t m = 0; m < M; ++m) {
      xscale[m] = round_row_int16(xf.data() + m * K, K, xq.data() + m * K);
      const std::vector<int16_t> row(xq.begin() + m * K, xq.begin() + (m + 1) * K),
          p = even_odd_order(row, vnni ? 64 : 32);
      std::copy(p.begin(), p.end(), xqp.begin() + m * K);
    }
    if (grouped) {
      stack.split([&](size_t i, int64_t a, int64_t b) {
        rows_dot_i8_grouped(ws[i].data_ptr<int8_t>(), xqp.data(), xscale.data(), gs[i], yf.data() + stack.start[i],
                            M, N, K, a, b, vnni);
      });
    } else over_stack(int8_t{}, [&](const int8_t* w, const float* s, float* y, int64_t a, int64_t b) {
      if (M > 1) rows_dot_i8_few(w, xqp.data(), xq.data(), xscale.data(), s, y, M, N, K, a, b, vnni);
      else if (vnni) rows_dot_i8_vnni(w, xqp.data(), xscale[0], s, y, K, a, b);
      else rows_dot_i8(w, xq.data(), xqp.data(), xscale[0], s, y, K, a, b);
    });
  } else {
    // bf16 weights meet the activations in even/odd order per 16 (see load16_even_odd).
    std::vector<float> xp = xf;
    if (dtype == at::kBFloat16)
      for (int64_t m = 0; m < M; ++m) {
        const std::vector<float> row(xf.begin() + m * K, xf.begin() + (m + 1) * K), p = even_odd_order(row, 16);
        std::copy(p.begin(), p.end(), xp.begin() + m * K);
      }
    auto run = [&](auto tag) {
      using T = decltype(tag);
      over_stack(tag, [&](const T* w, const float* s, float* y, int64_t a, int64_t b) {
        if (M > 1) rows_dot_few<T>(w, std::is_same_v<T, at::BFloat16> ? xp.data() : xf.data(), s, y, M, N, K, a, b);
        else rows_dot<T>(w, xf.data(), xp.data(), s, y, K, a, b);
      });
    };
    switch (dtype) {
      case at::kFloat: run(float{}); break;
      case at::kBFloat16: run(at::BFloat16{}); break;
      case at::kHalf: run(at::Half{}); break;
      default: TORCH_CHECK(false, "gemv: unsupported weight dtype ", dtype);
    }
  }
  return output_rows(x, stack.start, yf, biases);
}

// One matrix: x [..., K] times w [N, K] (see gemv_many).
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& scale,
                   const c10::optional<torch::Tensor>& bias) {
  return gemv_many(x, {w}, {scale}, {bias});
}

// x [..., K] (M rows in all; fp32, bf16 or fp16) times each of qweights, uint8 [N_i, K / 2] (two
// columns a byte, the even one low), with scales and offsets fp32 or fp16 [N_i, K / group] (s and
// z - 8 s of every group; group 32 or a multiple of 64, K a multiple of 64), biases[i] [N_i] or None.
// Returns [..., sum of N_i] in x's dtype, the matrices' products side by side (see gemv_many).
torch::Tensor gemv_int4_many(const torch::Tensor& x, const std::vector<torch::Tensor>& qweights,
                             const std::vector<torch::Tensor>& scales, const std::vector<torch::Tensor>& offsets,
                             int64_t group, const std::vector<c10::optional<torch::Tensor>>& biases) {
  TORCH_CHECK(!qweights.empty() && scales.size() == qweights.size() && offsets.size() == qweights.size() &&
              biases.size() == qweights.size(), "gemv_int4: one scale, offset and bias (or None) per weight");
  const int64_t K = qweights[0].dim() == 2 ? qweights[0].size(1) * 2 : 0, G = K / std::max<int64_t>(group, 1);
  TORCH_CHECK((group == 32 || group % 64 == 0) && group > 0 && K % group == 0, "gemv_int4: group ", group,
              " must be 32 or a multiple of 64 that divides K = ", K);
  TORCH_CHECK(x.size(-1) == K, "gemv_int4: x has ", x.size(-1), " columns, the weight ", K);
  for (size_t i = 0; i < qweights.size(); ++i) {
    const auto &w = qweights[i], &s = scales[i], &o = offsets[i];
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kByte && w.size(1) * 2 == K && K % 64 == 0,
                "gemv_int4: qweight must be contiguous uint8 [N, K / 2] with K % 64 == 0");
    TORCH_CHECK(s.sizes() == o.sizes() && s.dim() == 2 && s.size(0) == w.size(0) && s.size(1) == G &&
                (s.scalar_type() == at::kFloat || s.scalar_type() == at::kHalf) &&
                o.scalar_type() == scales[0].scalar_type() && s.scalar_type() == scales[0].scalar_type() &&
                s.is_contiguous() && o.is_contiguous(),
                "gemv_int4: scale and offset must be contiguous [N, K / group], all fp32 or all fp16");
  }
  const Stack stack(qweights);
  const int64_t M = x.numel() / K;
  const std::vector<float> xf = float_copy(x);
  const bool vnni = group % 128 == 0 && has_avx512_vnni();
  std::vector<float> xsum(M * G, 0.f), xscale(M);
  std::vector<int16_t> xq(K), xo(vnni ? K : 0), xqp(M * K);
  for (int64_t m = 0; m < M; ++m) {
    xscale[m] = round_row_int16(xf.data() + m * K, K, xq.data());
    if (vnni) {  // each 128 columns also interleaved, as rows_dot_i4_vnni reads them
      int4_order(xq.data(), K, xo.data());
      int4_order_512(xo.data(), K, xqp.data() + m * K);
    } else {
      int4_order(xq.data(), K, xqp.data() + m * K);
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = g * group; k < (g + 1) * group; ++k) xsum[m * G + g] += xf[m * K + k];
  }
  const int64_t N = stack.start.back();  // the output's row stride
  std::vector<float> yf(M * N);
  stack.split([&](size_t i, int64_t a, int64_t b) {
    const uint8_t* w = qweights[i].data_ptr<uint8_t>();
    float* y = yf.data() + stack.start[i];
    auto run = [&](const auto* s, const auto* o) {
      if (vnni) rows_dot_i4_vnni(w, xqp.data(), xsum.data(), xscale.data(), s, o, y, M, N, K, group, a, b);
      else rows_dot_i4(w, xqp.data(), xsum.data(), xscale.data(), s, o, y, M, N, K, group, a, b);
    };
    if (scales[i].scalar_type() == at::kFloat) run(scales[i].data_ptr<float>(), offsets[i].data_ptr<float>());
    else run(reinterpret_cast<const uint16_t*>(scales[i].data_ptr<at::Half>()),
             reinterpret_cast<const uint16_t*>(offsets[i].data_ptr<at::Half>()));
  });
  return output_rows(x, stack.start, yf, biases);
}

// One matrix (see gemv_int4_many).
torch::Tensor gemv_int4(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scale,
                        const torch::Tensor& offset, int64_t group, const c10::optional<torch::Tensor>& bias) {
  return gemv_int4_many(x, {qweight}, {scale}, {offset}, group, {bias});
}

// The float matrix [N, K] that int4 weights stand for, w = q s + (z - 8 s) per group (the same
// scale and offset tensors as gemv_int4: fp32 or fp16). A product of many rows is a matrix product,
// which a float GEMM does faster than the row kernel once the weights are decoded.
torch::Tensor dequantize_int4(const torch::Tensor& qweight, const torch::Tensor& scale, const torch::Tensor& offset,
                              int64_t group) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.scalar_type() == at::kByte,
              "dequantize_int4: qweight must be contiguous uint8 [N, K / 2]");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  TORCH_CHECK(group > 0 && group % 2 == 0 && K % group == 0, "dequantize_int4: group ", group, " must divide K = ", K);
  const int64_t G = K / group;
  TORCH_CHECK(scale.sizes() == offset.sizes() && scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G &&
              scale.scalar_type() == offset.scalar_type() &&
              (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf) && scale.is_contiguous() &&
              offset.is_contiguous(), "dequantize_int4: scale and offset must be contiguous [N, K / group], both fp32 or both fp16");
  torch::Tensor out = torch::empty({N, K}, qweight.options().dtype(torch::kFloat));
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  float* y = out.data_ptr<float>();
  auto run = [&](const auto* s, const auto* o) {
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const float sg = as_float(s[n * G + g]), og = as_float(o[n * G + g]);
        const uint8_t* b = w + n * (K / 2) + g * (group / 2);
        float* yo = y + n * K + g * group;
        for (int64_t j = 0; j < group / 2; ++j) {
          yo[2 * j] = static_cast<float>(b[j] & 0x0F) * sg + og;
          yo[2 * j + 1] = static_cast<float>(b[j] >> 4) * sg + og;
        }
      }
  };
  if (scale.scalar_type() == at::kFloat) run(scale.data_ptr<float>(), offset.data_ptr<float>());
  else run(reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()),
           reinterpret_cast<const uint16_t*>(offset.data_ptr<at::Half>()));
  return out;
}

// The float matrix [N, K] that int8 weights with a scale per group of K / G columns stand for,
// scales [N, G] fp32 or fp16 (as gemv takes them): w = q s.
torch::Tensor dequantize_int8(const torch::Tensor& qweight, const torch::Tensor& scales) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.scalar_type() == at::kChar,
              "dequantize_int8: qweight must be contiguous int8 [N, K]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) > 0 && K % scales.size(1) == 0 &&
              scales.is_contiguous() && (scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf),
              "dequantize_int8: scales must be contiguous fp32 or fp16 [N, G] with G dividing K");
  const int64_t G = scales.size(1), group = K / G;
  torch::Tensor out = torch::empty({N, K}, qweight.options().dtype(torch::kFloat));
  const int8_t* w = qweight.data_ptr<int8_t>();
  float* y = out.data_ptr<float>();
  auto run = [&](const auto* s) {
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const float sg = as_float(s[n * G + g]);
        const int8_t* q = w + n * K + g * group;
        float* yo = y + n * K + g * group;
        for (int64_t j = 0; j < group; ++j) yo[j] = static_cast<float>(q[j]) * sg;
      }
  };
  if (scales.scalar_type() == at::kFloat) run(scales.data_ptr<float>());
  else run(reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()));
  return out;
}

// Where one (sequence, KV head) pair's keys and values are: position t's rows at k + offsets[t]
// and v + offsets[t] (a paged pool), or, with no offsets, at k + t * k_stride and v + t * v_stride.
template <typename T>
struct HeadCache {
  const T* k;
  const T* v;
  int64_t k_stride, v_stride;
  const int64_t* offsets;
};

// Every (sequence, KV head) pair of q [B, H, 1, D] against Tk cached positions, split across
// threads; `cache_of(b, h)` says where the pair's keys and values are.
template <typename T, typename CacheOf>
void attention_jobs(const T* qp, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t Tk, const uint8_t* visible,
                    bool visible_per_row, float* out, CacheOf&& cache_of) {
  const int64_t G = H / Hkv, jobs = B * Hkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  // Threads by the positions actually attended, not the cache's length: a static cache is mostly
  // empty early on, and waking a thread team costs more than a few dozen positions.
  const int64_t mask_len = visible_per_row ? B * Tk : Tk;
  int64_t attended = 0;
  for (int64_t i = 0; i < mask_len; ++i) attended += visible[i] != 0;
  if (!visible_per_row) attended *= B;
  const int threads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(Hkv * attended / 256)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;
#pragma omp for schedule(static)
    for (int64_t j = 0; j < jobs; ++j) {
      const int64_t b = j / Hkv, h = j % Hkv;
      const HeadCache<T> c = cache_of(b, h);
      decode_attention_head(qp + (b * H + h * G) * D, c.k, c.v, c.k_stride, c.v_stride,
                            visible + (visible_per_row ? b * Tk : 0), out + (b * H + h * G) * D, G, Tk, D, scale,
                            scores, c.offsets);
    }
  }
}

// What both attention ops share: checks on the queries and the visibility mask, the dispatch on
// q's dtype (`run(T{}, q, visible, per_row, out)`), and the output [B, H, 1, D] in q's dtype.
template <typename Run>
torch::Tensor one_query_attention(const char* name, const torch::Tensor& q, int64_t Hkv, int64_t Tk,
                                  const torch::Tensor& visible, Run&& run) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && H / Hkv <= 8 && D % 8 == 0 && D <= 256, name,
              ": H a multiple of Hkv with H / Hkv <= 8, D a multiple of 8 up to 256");
  TORCH_CHECK(visible.numel() == Tk || visible.numel() == B * Tk, name,
              ": visible must have one entry per cached position (per sequence or shared)");
  const bool per_row = B > 1 && visible.numel() == B * Tk;
  torch::Tensor qc = q.contiguous(), vis = visible.to(torch::kBool).contiguous();
  const uint8_t* vp = reinterpret_cast<const uint8_t*>(vis.data_ptr<bool>());
  std::vector<float> out(B * H * D);
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}, qc, vp, per_row, out.data()); break;
    case at::kBFloat16: run(at::BFloat16{}, qc, vp, per_row, out.data()); break;
    case at::kHalf: run(at::Half{}, qc, vp, per_row, out.data()); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", q.scalar_type());
  }
  torch::Tensor result = torch::empty({B, H, 1, D}, q.options());
  result.copy_(torch::from_blob(out.data(), {B, H, 1, D}, torch::kFloat));
  return result;
}

// Attention of one query per sequence: q [B, H, 1, D], k and v [B, Hkv, T, D] (any strides with
// the last dimension contiguous), visible [T] or [B, T] bool (1 = attend). H a multiple of Hkv
// with H / Hkv <= 8.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& visible) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "decode_attention: 4-d q, k, v, one query");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "decode_attention: unsupported shapes");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.scalar_type() == q.scalar_type() &&
              v.scalar_type() == q.scalar_type(), "decode_attention: k and v rows must be contiguous, dtypes equal");
  const int64_t Hkv = k.size(1), Tk = k.size(2);
  return one_query_attention("decode_attention", q, Hkv, Tk, visible,
                             [&](auto tag, const torch::Tensor& qc, const uint8_t* vis, bool per_row, float* out) {
    using T = decltype(tag);
    const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    attention_jobs<T>(qc.data_ptr<T>(), q.size(0), q.size(1), Hkv, q.size(3), Tk, vis, per_row, out,
                      [&](int64_t b, int64_t h) {
      return HeadCache<T>{kp + b * k.stride(0) + h * k.stride(1), vp + b * v.stride(0) + h * v.stride(1),
                          k.stride(2), v.stride(2), nullptr};
    });
  });
}

// PagedAttention for one query per sequence: q [B, H, 1, D]; pool [S, 2 Hkv, D] with rows of D
// contiguous (each slot's keys, then its values); slots [B, T] int64, the pool slot of each
// sequence's position t; visible [T] or [B, T] bool. Keys and values are read where they lie in
// the pool, through the slot table, instead of being gathered into a padded copy first.
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& pool, const torch::Tensor& slots,
                                     const torch::Tensor& visible) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && pool.dim() == 3 && slots.dim() == 2 && slots.size(0) == q.size(0),
              "paged_decode_attention: q [B, H, 1, D], pool [S, 2 Hkv, D], slots [B, T]");
  TORCH_CHECK(pool.size(1) % 2 == 0 && pool.size(2) == q.size(3) && pool.stride(2) == 1 &&
              pool.stride(1) == pool.size(2) && pool.scalar_type() == q.scalar_type(),
              "paged_decode_attention: unsupported shapes, layout or dtypes");
  const int64_t Hkv = pool.size(1) / 2, Tk = slots.size(1), D = q.size(3);
  torch::Tensor sl = slots.to(torch::kLong).contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  std::vector<int64_t> offsets(sl.numel());
  for (size_t i = 0; i < offsets.size(); ++i) {
    TORCH_CHECK(sp[i] >= 0 && sp[i] < pool.size(0), "paged_decode_attention: slot ", sp[i], " outside the pool");
    offsets[i] = sp[i] * pool.stride(0);
  }
  return one_query_attention("paged_decode_attention", q, Hkv, Tk, visible,
                             [&](auto tag, const torch::Tensor& qc, const uint8_t* vis, bool per_row, float* out) {
    using T = decltype(tag);
    const T* pp = pool.data_ptr<T>();
    attention_jobs<T>(qc.data_ptr<T>(), q.size(0), q.size(1), Hkv, D, Tk, vis, per_row, out,
                      [&](int64_t b, int64_t h) {
      return HeadCache<T>{pp + h * D, pp + (Hkv + h) * D, 0, 0, offsets.data() + b * Tk};
    });
  });
}

// Which int8 path `gemv` takes on this CPU: "avx512_vnni" or "avx2".
std::string instruction_set() { return has_avx512_vnni() ? "avx512_vnni" : "avx2"; }

TORCH_LIBRARY(ember_gemv, m) {
  m.def("instruction_set() -> str", &instruction_set);
  m.def("gemv(Tensor x, Tensor w, Tensor? scale, Tensor? bias) -> Tensor");
  m.def("gemv_many(Tensor x, Tensor[] ws, Tensor?[] scales, Tensor?[] biases) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor qweight, Tensor scale, Tensor offset, int group, Tensor? bias) -> Tensor");
  m.def("gemv_int4_many(Tensor x, Tensor[] qweights, Tensor[] scales, Tensor[] offsets, int group, "
        "Tensor?[] biases) -> Tensor");
  m.def("dequantize_int4(Tensor qweight, Tensor scale, Tensor offset, int group) -> Tensor");
  m.def("dequantize_int8(Tensor qweight, Tensor scales) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor visible) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor pool, Tensor slots, Tensor visible) -> Tensor");
}
TORCH_LIBRARY_IMPL(ember_gemv, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("gemv_many", gemv_many);
  m.impl("gemv_int4", gemv_int4);
  m.impl("gemv_int4_many", gemv_int4_many);
  m.impl("dequantize_int4", dequantize_int4);
  m.impl("dequantize_int8", dequantize_int8);
  m.impl("decode_attention", decode_attention);
  m.impl("paged_decode_attention", paged_decode_attention);
}
