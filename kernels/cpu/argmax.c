/* Greedy sampling's argmax over rows of logits on the CPU (kernels/cpu_argmax.py): torch's argmax over a [32,
 * 16384] batch of logits costs ~0.6 ms here. Same answer as torch.argmax: the first index of the largest value, or
 * of the first NaN where a row holds one.
 */
#include <math.h>
#include <stdint.h>

#include "simd.h"

#define LANES 4 /* independent vectors a step: the max's compare-and-select chains overlap */

static int64_t row_argmax(const float *p, int64_t n) {
  vf best[LANES];
  vi nan = (vi){0};
  for (int l = 0; l < LANES; l++) best[l] = splat(-INFINITY);
  int64_t j = 0;
  for (; j + LANES * VW <= n; j += LANES * VW) /* the largest value, and whether there is a NaN */
    for (int l = 0; l < LANES; l++) {
      const vf v = load_f32(p + j + l * VW);
      nan |= (vi)(v != v);
      best[l] = vsel((vi)(v > best[l]), v, best[l]);
    }
  float m = -INFINITY;
  int has_nan = hor(nan) != 0;
  for (int l = 0; l < LANES; l++)
    for (int i = 0; i < VW; i++) m = best[l][i] > m ? best[l][i] : m;
  for (int64_t i = j; i < n; i++) {
    if (isnan(p[i])) has_nan = 1;
    if (p[i] > m) m = p[i];
  }
  const vf target = splat(m);
  for (j = 0; j + LANES * VW <= n; j += LANES * VW) { /* its first place (every value -inf: index 0) */
    vi hit = (vi){0};
    for (int l = 0; l < LANES; l++) {
      const vf v = load_f32(p + j + l * VW);
      hit |= has_nan ? (vi)(v != v) : (vi)(v == target);
    }
    if (hor(hit)) break;
  }
  for (int64_t i = j; i < n; i++)
    if (has_nan ? isnan(p[i]) : p[i] == m) return i;
  return 0;
}

/* x: `rows` rows of `n` fp32 values, `stride` apart -> out [rows] int64. Status 0, -1 for sizes it does not take. */
int em_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out) {
  if (n < 1 || rows < 0 || stride < n) return -1;
  for (int64_t r = 0; r < rows; r++) out[r] = row_argmax(x + r * stride, n);
  return 0;
}
