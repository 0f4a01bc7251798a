/* Per-token FP8 activations on the CPU, one pass each way, and block-scaled FP8 weights dequantized. Called
 * through ctypes by kernels/cpu_act.py; the torch references (kernels/reference.py act_quant, act_dequant,
 * weight_dequant) define the results and these are bit-identical to them (tests/test_cpu_codec_kernels.py).
 *
 * em_act_quant: x [T, K] fp32 (row stride `ld`) -> q [T, K] e4m3 bytes, s [T, ceil(K/128)] fp32:
 *   s = max(amax of the 128 channels, 1e-4) / 448, q = e4m3(clamp(x / s, +-448)), rounded to nearest even.
 *   A group holding a NaN or an infinity -> status 1 and nothing promised (the caller uses torch, whose NaN
 *   rules it then gets exactly).
 * em_act_dequant: q [T, K] e4m3 bytes, s [T, ceil(K/128)] fp32 -> out [T, K] fp32 (kind 0) or bf16 (kind 1, raw
 *   16-bit words): q * s in fp32, then rounded to the output type. Status 1 when any output would not be finite
 *   (a NaN byte, a non-finite scale, a product that overflows); the output is then incomplete.
 * em_fp8_dequant: the same over q [N, K] whose scale rows each cover `rows_per_scale` rows (1: activations, 128:
 *   weights in 128x128 blocks, s [ceil(N/128), ceil(K/128)]), rows split over `threads` OpenMP threads.
 * All return -1 for bad sizes.
 */
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define BLOCK 128

static inline uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

static inline float float_of(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* |f| <= 448, finite -> the e4m3fn byte nearest to it (ties to even) */
static inline uint8_t e4m3_of(float f) {
  const uint32_t u = bits_of(f), sign = (u >> 24) & 0x80, mag = u & 0x7FFFFFFFu;
  uint32_t code;
  if (mag < (121u << 23)) {
    /* below 2^-6, e4m3's smallest normal: multiples of 2^-9. Adding 2^14 (whose ulp is 2^-9) rounds to the
     * nearest one; the mantissa bits then count them (8 of them is 2^-6, the code of the smallest normal) */
    code = bits_of(float_of(mag) + 0x1p14f) - bits_of(0x1p14f);
  } else {
    /* rebias the exponent (127 -> 7), keep 3 mantissa bits, round the 20 dropped ones to nearest even */
    code = (mag - (120u << 23) + 0x7FFFFu + ((mag >> 20) & 1)) >> 20;
  }
  return (uint8_t)(code | sign);
}

/* e4m3_of, lane by lane: both roundings computed, the right one kept */
static inline vb e4m3_of_v(vf f) {
  vu u;
  memcpy(&u, &f, sizeof u);
  const vu sign = (u >> 24) & 0x80, mag = u & 0x7FFFFFFFu;
  const vf shifted = as_vf(mag) + 0x1p14f;
  vu sub;
  memcpy(&sub, &shifted, sizeof sub);
  sub -= bits_of(0x1p14f);
  const vu normal = (mag - (120u << 23) + 0x7FFFFu + ((mag >> 20) & 1)) >> 20;
  const vu small = (vu)(mag < (121u << 23));
  return __builtin_convertvector((sub & small) | (normal & ~small) | sign, vb);
}

int em_act_quant(const float *x, int64_t t_rows, int64_t k, int64_t ld, uint8_t *q, float *s) {
  if (t_rows < 0 || k <= 0 || ld < k) return -1;
  const int64_t kb = (k + BLOCK - 1) / BLOCK;
  const vf hi = splat(448.f), lo = splat(-448.f);
  for (int64_t t = 0; t < t_rows; t++) {
    const float *xr = x + t * ld;
    for (int64_t b = 0; b < kb; b++) {
      const int64_t lo_col = b * BLOCK, n = (k - lo_col < BLOCK) ? k - lo_col : BLOCK;
      const float *xb = xr + lo_col;
      vu vmax = {0};
      int64_t j = 0;
      for (; j + VW <= n; j += VW) { /* |x| as integers orders like the floats; NaN and inf sort above all */
        vu m;
        memcpy(&m, xb + j, sizeof m);
        m &= 0x7FFFFFFFu;
        vmax = (vu)((vi)(m > vmax) & (vi)m) | (vu)(~(vi)(m > vmax) & (vi)vmax);
      }
      uint32_t amax_bits = 0;
      for (int i = 0; i < VW; i++) amax_bits = vmax[i] > amax_bits ? vmax[i] : amax_bits;
      for (; j < n; j++) {
        const uint32_t m = bits_of(xb[j]) & 0x7FFFFFFFu;
        amax_bits = m > amax_bits ? m : amax_bits;
      }
      if (amax_bits >= 0x7F800000u) return 1; /* an infinity or a NaN */
      const float amax = float_of(amax_bits), scale = (amax > 1e-4f ? amax : 1e-4f) / 448.f;
      s[t * kb + b] = scale;
      const vf vs = splat(scale);
      uint8_t *qb = q + t * k + lo_col;
      for (j = 0; j + VW <= n; j += VW) {
        vf y = load_f32(xb + j) / vs;
        y = vsel(y > hi, hi, vsel(y < lo, lo, y));
        const vb code = e4m3_of_v(y);
        memcpy(qb + j, &code, sizeof code);
      }
      for (; j < n; j++) {
        float y = xb[j] / scale;
        y = y > 448.f ? 448.f : (y < -448.f ? -448.f : y);
        qb[j] = e4m3_of(y);
      }
    }
  }
  return 0;
}

/* one row of em_fp8_dequant: q [K] with its scales [ceil(K/128)] -> out [K]; whether an output is not finite */
static uint32_t dequant_row(const uint8_t *q, const float *s, int64_t k, int kind, void *out) {
  uint32_t bad = 0;
  for (int64_t lo = 0; lo < k; lo += BLOCK) {
    const int64_t n = (k - lo < BLOCK) ? k - lo : BLOCK;
    const float scale = s[lo / BLOCK];
    const vf vs = splat(scale);
    int64_t j = 0;
    if (kind == 0) {
      float *o = (float *)out + lo;
      for (; j + VW <= n; j += VW) {
        const vf v = load_e4m3(q + lo + j) * vs;
        vu u;
        memcpy(&u, &v, sizeof u);
        bad |= hor((u & 0x7F800000u) == 0x7F800000u);
        memcpy(o + j, &v, sizeof v);
      }
      for (; j < n; j++) {
        const float v = e4m3_value(q[lo + j]) * scale;
        bad |= (bits_of(v) & 0x7F800000u) == 0x7F800000u;
        o[j] = v;
      }
    } else {
      uint16_t *o = (uint16_t *)out + lo;
      for (; j + VW <= n; j += VW) {
        const vf v = load_e4m3(q + lo + j) * vs;
        vu u;
        memcpy(&u, &v, sizeof u);
        u = (u + 0x7FFFu + ((u >> 16) & 1)) >> 16; /* to bf16, nearest even (inputs finite: no wrap) */
        bad |= hor((u & 0x7F80u) == 0x7F80u);
        const vh h = __builtin_convertvector(u, vh);
        memcpy(o + j, &h, sizeof h);
      }
      for (; j < n; j++) {
        const uint32_t u = bits_of(e4m3_value(q[lo + j]) * scale), h = (u + 0x7FFFu + ((u >> 16) & 1)) >> 16;
        bad |= (h & 0x7F80u) == 0x7F80u;
        o[j] = (uint16_t)h;
      }
    }
  }
  return bad;
}

int em_fp8_dequant(const uint8_t *q, const float *s, int64_t rows, int64_t k, int64_t rows_per_scale, int kind,
                   void *out, int threads) {
  if (rows < 0 || k <= 0 || rows_per_scale <= 0 || (kind != 0 && kind != 1)) return -1;
  const int64_t kb = (k + BLOCK - 1) / BLOCK, scale_rows = (rows + rows_per_scale - 1) / rows_per_scale;
  const size_t width = kind == 0 ? 4 : 2;
  uint32_t bad = 0;
  for (int64_t i = 0; i < rows * k; i++) bad |= (q[i] & 0x7F) == 0x7F; /* e4m3fn's NaN bytes */
  for (int64_t i = 0; i < scale_rows * kb; i++) bad |= (bits_of(s[i]) & 0x7F800000u) == 0x7F800000u;
  if (bad) return 1;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) reduction(| : bad) schedule(static)
  for (int64_t t = 0; t < rows; t++)
    bad |= dequant_row(q + t * k, s + (t / rows_per_scale) * kb, k, kind, (char *)out + (size_t)(t * k) * width);
  return bad ? 1 : 0;
}

int em_act_dequant(const uint8_t *q, const float *s, int64_t t_rows, int64_t k, int kind, void *out) {
  return em_fp8_dequant(q, s, t_rows, k, 1, kind, out, 1);
}
