/* RMSNorm over the rows of an fp32 matrix on the CPU (kernels/cpu_norm.py): torch's CPU rms_norm runs as ~6 ops
 * (square, mean, add, rsqrt, two products), ~25 us at decode sizes where the arithmetic is 1 us.
 * out[r] = x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * w, the sum of squares in fp32 over VW lanes, then the lanes.
 */
#include <math.h>
#include <stdint.h>

#include "simd.h"

/* x: rows of n values, `stride` apart; out: rows of n, contiguous. Status 0, -1 for sizes it does not take. */
int em_rms_norm(const float *x, int64_t rows, int64_t n, int64_t stride, const float *w, float eps, float *out) {
  if (n < 1 || rows < 0 || stride < n) return -1;
  for (int64_t r = 0; r < rows; r++) {
    const float *p = x + r * stride;
    float *o = out + r * n;
    vf acc = (vf){0};
    int64_t j = 0;
    for (; j + VW <= n; j += VW) {
      const vf v = load_f32(p + j);
      acc += v * v;
    }
    float ss = hsum(acc);
    for (; j < n; j++) ss += p[j] * p[j];
    const float inv = 1.f / sqrtf(ss / (float)n + eps);
    const vf s = splat(inv);
    for (j = 0; j + VW <= n; j += VW) store_f32(o + j, load_f32(p + j) * s * load_f32(w + j));
    for (; j < n; j++) o[j] = p[j] * inv * w[j];
  }
  return 0;
}
