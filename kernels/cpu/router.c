/* DeepSeek-V3's routing choice on the CPU, one pass per token: the ~14 small torch ops of the group-limited top-k
 * (services/gateway/router.py holds the reference) as one call. Called through ctypes by kernels/cpu_router.py.
 *
 * scores [T, E] fp32 (sigmoid of the router's logits), bias [E] fp32 (e_score_correction_bias).
 *   choice = scores + bias (selection only);
 *   with G > 1 groups of E / G experts: a group's score is the sum of its two best choices; only the best
 *   `topk_group` groups stay;
 *   idx [T, K] int64: the K best choices among the staying experts, best first;
 *   weight [T, K] fp32: their unbiased scores, divided by their sum (+ 1e-20) when `norm`, times `factor`.
 * Comparisons: larger first; a NaN before any number (as torch's topk orders them); ties to the lower index.
 */
#include <math.h>
#include <stdint.h>

#define MAX_EXPERTS 1024

static inline int beats(float a, int64_t ia, float b, int64_t ib) {
  if (isnan(a) || isnan(b)) return isnan(a) && (!isnan(b) || ia < ib);
  return a > b || (a == b && ia < ib);
}

/* Status: 0 done, -1 sizes the kernel does not take (the caller uses torch) */
int em_route(const float *scores, const float *bias, int64_t tokens, int64_t experts, int64_t groups,
             int64_t topk_group, int64_t k, int norm, float factor, int64_t *idx, float *weight) {
  if (experts < 1 || experts > MAX_EXPERTS || groups < 1 || experts % groups) return -1;
  const int64_t per = experts / groups;
  if (k < 1 || topk_group < 1 || topk_group > groups || k > topk_group * per || (groups > 1 && per < 2)) return -1;
  float choice[MAX_EXPERTS], gscore[MAX_EXPERTS];
  unsigned char open[MAX_EXPERTS]; /* an expert that may still be chosen */
  for (int64_t t = 0; t < tokens; t++) {
    const float *s = scores + t * experts;
    int64_t *ix = idx + t * k;
    float *w = weight + t * k;
    for (int64_t e = 0; e < experts; e++) choice[e] = s[e] + bias[e], open[e] = groups == 1;
    if (groups > 1) {
      for (int64_t g = 0; g < groups; g++) { /* the sum of the group's two best choices */
        const int64_t o = g * per;
        int64_t a = o, b = o + 1;
        if (beats(choice[b], b, choice[a], a)) a = o + 1, b = o;
        for (int64_t e = o + 2; e < o + per; e++) {
          if (beats(choice[e], e, choice[a], a))
            b = a, a = e;
          else if (beats(choice[e], e, choice[b], b))
            b = e;
        }
        gscore[g] = choice[a] + choice[b];
      }
      for (int64_t n = 0; n < topk_group; n++) { /* the best groups stay open */
        int64_t best = -1;
        for (int64_t g = 0; g < groups; g++)
          if (!open[g * per] && (best < 0 || beats(gscore[g], g, gscore[best], best))) best = g;
        for (int64_t e = best * per; e < (best + 1) * per; e++) open[e] = 1;
      }
    }
    for (int64_t j = 0; j < k; j++) { /* the K best open experts, best first */
      int64_t best = -1;
      for (int64_t e = 0; e < experts; e++)
        if (open[e] && (best < 0 || beats(choice[e], e, choice[best], best))) best = e;
      open[best] = 0;
      ix[j] = best;
      w[j] = s[best];
    }
    if (norm) {
      float sum = w[0];
      for (int64_t j = 1; j < k; j++) sum += w[j];
      sum += 1e-20f;
      for (int64_t j = 0; j < k; j++) w[j] = w[j] / sum;
    }
    for (int64_t j = 0; j < k; j++) w[j] *= factor;
  }
  return 0;
}
