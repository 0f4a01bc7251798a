/* What the CPU kernels share: vectors of VW lanes (gcc vector extensions: AVX-512 or AVX2 as -march=native
 * gives), loads of fp32, bf16 and e4m3 values into fp32 lanes. */
#ifndef EM_SIMD_H
#define EM_SIMD_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));
typedef uint8_t vb __attribute__((vector_size(VW)));

static inline vf as_vf(vu u) {
  vf f;
  memcpy(&f, &u, sizeof f);
  return f;
}

typedef int32_t vi __attribute__((vector_size(VW * 4))); /* a comparison's result: -1 or 0 per lane */

static inline vf load_f32(const float *p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void store_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline vf splat(float x) { return x - (vf){0}; } /* x - 0 is exact: one broadcast, no add */

static inline vf vsel(vi m, vf a, vf b) { /* m ? a : b, lane by lane */
  vi ai, bi;
  memcpy(&ai, &a, sizeof ai);
  memcpy(&bi, &b, sizeof bi);
  ai = (ai & m) | (bi & ~m);
  memcpy(&a, &ai, sizeof a);
  return a;
}

static inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; i++) s += v[i];
  return s;
}

static inline vf load_bf16(const uint16_t *p) { /* bf16 is the top half of an fp32 */
  vh w;
  memcpy(&w, p, sizeof w);
  return as_vf(__builtin_convertvector(w, vu) << 16);
}

/* e4m3 (bias 7, no infinities) exactly. With F16C (every AVX2 CPU has it) through fp16, whose conversion to fp32
 * is one instruction: each byte in the high half of a 16-bit lane, shifted right by one (the sign stays on top
 * and is copied below it) and that copy cleared, is the fp16 with e4m3's exponent and mantissa bits, i.e. the
 * e4m3 value / 2^8, subnormals included; times 2^8 is exact. Without F16C: the exponent and mantissa bits
 * placed in an fp32's (bias 127), scaled by 2^112 (2^120 / 2^8), then the sign (its fp32 intermediates of e4m3's
 * subnormals are denormals, which some CPUs multiply slowly). */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vf load_e4m3_div256(const uint8_t *p) {
  __m256i w = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)), 8);
  w = _mm256_and_si256(_mm256_srai_epi16(w, 1), _mm256_set1_epi16((short)0xBFFF));
  const __m512 f = _mm512_cvtph_ps(w);
  vf v;
  memcpy(&v, &f, sizeof v);
  return v;
}
#elif defined(__F16C__)
#include <immintrin.h>
static inline vf load_e4m3_div256(const uint8_t *p) {
  __m128i w = _mm_unpacklo_epi8(_mm_setzero_si128(), _mm_loadl_epi64((const __m128i *)p));
  w = _mm_and_si128(_mm_srai_epi16(w, 1), _mm_set1_epi16((short)0xBFFF));
  const __m256 f = _mm256_cvtph_ps(w);
  vf v;
  memcpy(&v, &f, sizeof v);
  return v;
}
#else
static inline vf load_e4m3_div256(const uint8_t *p) {
  vb b;
  memcpy(&b, p, sizeof b);
  const vu u = __builtin_convertvector(b, vu);
  vu mag;
  const vf f = as_vf((u & 0x7F) << 20) * 0x1p112f;
  memcpy(&mag, &f, sizeof mag);
  return as_vf(mag | (u & 0x80) << 24);
}
#endif

static inline vf load_e4m3(const uint8_t *p) { return load_e4m3_div256(p) * 0x1p8f; } /* exact */

/* one e4m3 byte's value, as load_e4m3 computes it lane by lane */
static inline float e4m3_value(uint8_t b) {
  uint32_t mag = (uint32_t)(b & 0x7F) << 20;
  float f;
  memcpy(&f, &mag, 4);
  f *= 0x1p120f;
  memcpy(&mag, &f, 4);
  mag |= (uint32_t)(b & 0x80) << 24;
  memcpy(&f, &mag, 4);
  return f;
}

/* whether any lane of a comparison's result is set */
static inline uint32_t hor(vi m) {
  int32_t r = 0;
  for (int i = 0; i < VW; i++) r |= m[i];
  return r != 0;
}

#endif
