/* Absorbed MLA attention on the CPU, read straight from the paged latent cache: one pass over each sequence's
 * keys with an online softmax (no gathered copy of the context, no [rows, L] score tensor, no mask tensor).
 * Called through ctypes by kernels/cpu_attention.py (kernels/cpu_build.py builds this file).
 *
 * In the absorbed form every head reads the same per-token latent row [C + R] (kv_norm(c_kv) | roped k_pe): the
 * keys are the whole row, the values its first C entries. So a sequence's query rows (its new tokens x heads)
 * all stream the one key row per position, and the work is what the tokens need: rows x keys x (D + C).
 *
 * query rows, flat over the step's tokens: q_lat [T, nh, C] fp32 (W_UK-absorbed q_nope) and q_pe [T, nh, R]
 * fp32 (roped), each at its own token and head strides (values contiguous), read as one row of D = C + R;
 * cache [slots, D] fp32 (one layer); key_slots [B, width]: the cache slot of each sequence's keys in order;
 * per sequence b: its new tokens are q rows q_start[b] .. + q_len[b], at the last q_len[b] of its k_len[b] key
 * positions (causal: new token j sees keys 0 .. k_len - q_len + j).
 * out [T, nh, C] fp32 at its token and head strides = softmax(scale * q . keys) . values, per row; fp32
 * throughout.
 * Returns 0, or -1 bad sizes, -2 a sequence's tokens outside 0..T-1 or more new tokens than keys (or keys past
 * width), -3 a key slot outside the cache, -4 no memory. Nothing is written unless every index is valid.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define NV 4           /* score vectors a row holds for one key block */
#define KB (NV * VW)   /* keys a block */
#define RB 4           /* query rows computed together */
#define ROW_TARGET 64  /* query rows a work item aims at (tokens x heads), amortizing each key row read */
/* from this many rows a key block is transposed once (then every score is a plain FMA over keys); fewer rows
 * take dot products per key, each summed across lanes by a shuffle tree (measured faster up to 16 rows) */
#define TRANSPOSE_ROWS 32

static inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < VW; i++) m = v[i] > m ? v[i] : m;
  return m;
}

/* the lane sums of 4 vectors at once (a tree of shuffles: ~13 operations, not 4 chains of VW dependent adds) */
static inline void hsum4(const vf *a, float *out) {
#if VW == 16
  const vi lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const vi lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const vi hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const vi sw1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  const vi sw2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
  const vf x = __builtin_shuffle(a[0], a[1], lo1) + __builtin_shuffle(a[0], a[1], hi1); /* rows 0 | 1 */
  const vf y = __builtin_shuffle(a[2], a[3], lo1) + __builtin_shuffle(a[2], a[3], hi1); /* rows 2 | 3 */
  vf z = __builtin_shuffle(x, y, lo2) + __builtin_shuffle(x, y, hi2);                  /* 4 lanes a row */
  z += __builtin_shuffle(z, sw1);
  z += __builtin_shuffle(z, sw2);
  for (int r = 0; r < 4; r++) out[r] = z[4 * r];
#else
  const vi lo1 = {0, 1, 2, 3, 8, 9, 10, 11}, hi1 = {4, 5, 6, 7, 12, 13, 14, 15};
  const vi lo2 = {0, 1, 4, 5, 8, 9, 12, 13}, hi2 = {2, 3, 6, 7, 10, 11, 14, 15};
  const vi sw1 = {1, 0, 3, 2, 5, 4, 7, 6};
  const vf x = __builtin_shuffle(a[0], a[1], lo1) + __builtin_shuffle(a[0], a[1], hi1);
  const vf y = __builtin_shuffle(a[2], a[3], lo1) + __builtin_shuffle(a[2], a[3], hi1);
  vf z = __builtin_shuffle(x, y, lo2) + __builtin_shuffle(x, y, hi2); /* 2 lanes a row */
  z += __builtin_shuffle(z, sw1);
  for (int r = 0; r < 4; r++) out[r] = z[2 * r];
#endif
}

static const float IOTA[64] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                               22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
                               44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63};

/* r[VW] rows -> their transpose, in log2(VW) stages of two-source shuffles (stage h swaps the off-diagonal
 * h x h blocks of every 2h x 2h block) */
#if VW == 16
static const vi TLO[4] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}, {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}, {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}, {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
static const vi THI[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}, {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}, {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}, {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};
#else
static const vi TLO[3] = {{0, 1, 2, 3, 8, 9, 10, 11}, {0, 1, 8, 9, 4, 5, 12, 13}, {0, 8, 2, 10, 4, 12, 6, 14}};
static const vi THI[3] = {{4, 5, 6, 7, 12, 13, 14, 15}, {2, 3, 10, 11, 6, 7, 14, 15}, {1, 9, 3, 11, 5, 13, 7, 15}};
#endif

static inline void transpose_vw(vf *r) {
  int stage = 0;
  for (int h = VW / 2; h >= 1; h /= 2, stage++)
    for (int base = 0; base < VW; base += 2 * h)
      for (int i = base; i < base + h; i++) {
        const vf a = r[i], b = r[i + h];
        r[i] = __builtin_shuffle(a, b, TLO[stage]);
        r[i + h] = __builtin_shuffle(a, b, THI[stage]);
      }
}

/* kt[j * KB + k] = key[k][j] for the block's kb keys (VW x VW tiles in registers, scalar tails) */
static void transpose_block(const float *const *key, int64_t kb, int64_t d, float *kt) {
  int64_t k0 = 0;
  for (; k0 + VW <= kb; k0 += VW) {
    int64_t j0 = 0;
    for (; j0 + VW <= d; j0 += VW) {
      vf r[VW];
      for (int i = 0; i < VW; i++) r[i] = load_f32(key[k0 + i] + j0);
      transpose_vw(r);
      for (int i = 0; i < VW; i++) store_f32(kt + (j0 + i) * KB + k0, r[i]);
    }
    for (; j0 < d; j0++)
      for (int i = 0; i < VW; i++) kt[j0 * KB + k0 + i] = key[k0 + i][j0];
  }
  for (; k0 < kb; k0++)
    for (int64_t j = 0; j < d; j++) kt[j * KB + k0] = key[k0][j];
}

/* e^x for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial (Cephes' expf coefficients),
 * 2^n built in the exponent bits. Below -87 it returns ~1e-38, not 0 (callers zero masked keys themselves). */
static inline vf vexp(vf x) {
  x = vsel(x < splat(-87.f), splat(-87.f), x);
  const vf t = x * 1.44269504f + 12582912.f; /* round(x / ln2) sits in t's low mantissa bits */
  const vf n = t - 12582912.f;
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  vi ti;
  memcpy(&ti, &t, sizeof ti);
  const vi bits = (ti - 0x4B400000 + 127) << 23;
  vf scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

typedef struct {
  const float *q_lat, *q_pe, *cache;
  int64_t lat_ts, lat_hs, pe_ts, pe_hs; /* token and head strides of the two query parts */
  const int64_t *key_slots;
  int64_t nh, c, d, width;
  float scale;
  float *out;
  int64_t out_ts, out_hs;
} args_t;

typedef struct {
  int64_t b, t0, t1; /* sequence, its new tokens t0 .. t1 - 1 (0-based within the chunk) */
} item_t;

typedef struct {
  float *q;   /* [rp, d] the item's query rows, padded with zero rows to a multiple of RB */
  float *s;   /* [rp, KB] scores, then probabilities */
  float *kt;  /* [d, KB] a key block transposed (many rows) */
  float *acc; /* [rp, c] */
  float *m, *l;
  int64_t *lim; /* [rp] keys each row sees */
} scratch_t;

/* scores of RB rows against the block's keys, each key row read once for the RB rows (few rows: no transpose) */
static void scores_dot(const args_t *a, const scratch_t *w, int64_t r0, const float *const *key, int64_t kb) {
  const int64_t d = a->d, dv = d / VW * VW;
  for (int64_t k = 0; k < kb; k++) {
    vf acc[RB] = {{0}};
    for (int64_t j = 0; j < dv; j += VW) {
      const vf kv = load_f32(key[k] + j);
      for (int r = 0; r < RB; r++) acc[r] += load_f32(w->q + (r0 + r) * d + j) * kv;
    }
    float sum[RB];
    hsum4(acc, sum);
    for (int r = 0; r < RB; r++) {
      for (int64_t j = dv; j < d; j++) sum[r] += w->q[(r0 + r) * d + j] * key[k][j];
      w->s[(r0 + r) * KB + k] = sum[r] * a->scale;
    }
  }
}

/* scores of RB rows against a transposed key block: NV x RB accumulators, one broadcast query value a step */
static void scores_t(const args_t *a, const scratch_t *w, int64_t r0) {
  vf acc[RB][NV] = {{{0}}};
  for (int64_t j = 0; j < a->d; j++) {
    vf kv[NV];
    for (int v = 0; v < NV; v++) kv[v] = load_f32(w->kt + j * KB + v * VW);
    for (int r = 0; r < RB; r++) {
      const vf qv = splat(w->q[(r0 + r) * a->d + j]);
      for (int v = 0; v < NV; v++) acc[r][v] += qv * kv[v];
    }
  }
  for (int r = 0; r < RB; r++)
    for (int v = 0; v < NV; v++) store_f32(w->s + (r0 + r) * KB + v * VW, acc[r][v] * a->scale);
}

/* online softmax over the block for row r (keys k0 .. k0 + kb - 1): probabilities into s, acc rescaled */
static void softmax_block(const args_t *a, const scratch_t *w, int64_t r, int64_t k0, int64_t kb) {
  float *s = w->s + r * KB;
  int64_t valid = w->lim[r] - k0;
  valid = valid < 0 ? 0 : valid > kb ? kb : valid;
  if (valid == 0) {
    memset(s, 0, KB * sizeof(float));
    return;
  }
  vf mv = splat(w->m[r]);
  for (int v = 0; v < NV; v++) {
    const vi in = load_f32(IOTA + v * VW) < splat((float)valid);
    mv = vsel(in & (load_f32(s + v * VW) > mv), load_f32(s + v * VW), mv);
  }
  const float mx = hmax(mv);
  vf sum = {0};
  for (int v = 0; v < NV; v++) {
    const vi in = load_f32(IOTA + v * VW) < splat((float)valid);
    const vf p = vsel(in, vexp(load_f32(s + v * VW) - mx), splat(0.f));
    store_f32(s + v * VW, p);
    sum += p;
  }
  const float corr = w->m[r] == -FLT_MAX ? 0.f : expf(w->m[r] - mx);
  if (corr != 1.f) {
    float *acc = w->acc + r * a->c;
    for (int64_t j = 0; j < a->c; j++) acc[j] *= corr;
  }
  w->l[r] = w->l[r] * corr + hsum(sum);
  w->m[r] = mx;
}

/* acc[r0 .. r0 + RB) += p . values (each value row read once for the RB rows) */
static void accumulate(const args_t *a, const scratch_t *w, int64_t r0, const float *const *key, int64_t kb) {
  const int64_t c = a->c, cv = c / VW * VW;
  for (int64_t j = 0; j < cv; j += VW) {
    vf acc[RB];
    for (int r = 0; r < RB; r++) acc[r] = load_f32(w->acc + (r0 + r) * c + j);
    for (int64_t k = 0; k < kb; k++) {
      const vf v = load_f32(key[k] + j);
      for (int r = 0; r < RB; r++) acc[r] += splat(w->s[(r0 + r) * KB + k]) * v;
    }
    for (int r = 0; r < RB; r++) store_f32(w->acc + (r0 + r) * c + j, acc[r]);
  }
  for (int64_t j = cv; j < c; j++)
    for (int r = 0; r < RB; r++) {
      float s = w->acc[(r0 + r) * c + j];
      for (int64_t k = 0; k < kb; k++) s += w->s[(r0 + r) * KB + k] * key[k][j];
      w->acc[(r0 + r) * c + j] = s;
    }
}

static void run_item(const args_t *a, const int64_t *q_start, const int64_t *q_len, const int64_t *k_len,
                     const item_t *it, scratch_t *w) {
  const int64_t nh = a->nh, d = a->d, c = a->c;
  const int64_t rows = (it->t1 - it->t0) * nh, rp = (rows + RB - 1) / RB * RB;
  const int64_t first = k_len[it->b] - q_len[it->b]; /* keys before the chunk's first token */
  const int64_t t0 = q_start[it->b] + it->t0; /* the item's first token in the step */
  for (int64_t r = 0; r < rows; r++) {
    const int64_t t = t0 + r / nh, h = r % nh;
    memcpy(w->q + r * d, a->q_lat + t * a->lat_ts + h * a->lat_hs, c * sizeof(float));
    memcpy(w->q + r * d + c, a->q_pe + t * a->pe_ts + h * a->pe_hs, (d - c) * sizeof(float));
  }
  memset(w->q + rows * d, 0, (rp - rows) * d * sizeof(float));
  memset(w->acc, 0, rp * c * sizeof(float));
  for (int64_t r = 0; r < rp; r++) {
    w->m[r] = -FLT_MAX;
    w->l[r] = 0.f;
    w->lim[r] = r < rows ? first + it->t0 + r / nh + 1 : 0;
  }
  const int64_t keys = first + it->t1; /* the last token's view */
  const int64_t *slots = a->key_slots + it->b * a->width;
  const int transpose = rows >= TRANSPOSE_ROWS;
  const float *key[KB];
  for (int64_t k0 = 0; k0 < keys; k0 += KB) {
    const int64_t kb = keys - k0 < KB ? keys - k0 : KB;
    for (int64_t k = 0; k < kb; k++) key[k] = a->cache + slots[k0 + k] * d;
    if (transpose) {
      if (kb < KB) memset(w->kt, 0, d * KB * sizeof(float));
      transpose_block(key, kb, d, w->kt);
    }
    for (int64_t r0 = 0; r0 < rp; r0 += RB) {
      int64_t seen = 0; /* the rows' furthest key (padding rows see none) */
      for (int r = 0; r < RB; r++) seen = w->lim[r0 + r] > seen ? w->lim[r0 + r] : seen;
      if (seen <= k0) continue;
      if (transpose)
        scores_t(a, w, r0);
      else
        scores_dot(a, w, r0, key, kb);
      for (int r = 0; r < RB; r++) softmax_block(a, w, r0 + r, k0, kb);
      accumulate(a, w, r0, key, kb);
    }
  }
  for (int64_t r = 0; r < rows; r++) {
    float *out = a->out + (t0 + r / nh) * a->out_ts + (r % nh) * a->out_hs;
    const float inv = 1.f / w->l[r];
    for (int64_t j = 0; j < c; j++) out[j] = w->acc[r * c + j] * inv;
  }
}

int em_latent_attention(const float *q_lat, int64_t lat_ts, int64_t lat_hs, const float *q_pe, int64_t pe_ts,
                        int64_t pe_hs, int64_t t, int64_t nh, int64_t c, int64_t d, const float *cache,
                        int64_t slots, const int64_t *key_slots, int64_t width, const int64_t *q_start,
                        const int64_t *q_len, const int64_t *k_len, int64_t b, float scale, float *out,
                        int64_t out_ts, int64_t out_hs, int threads) {
  if (t < 0 || nh <= 0 || c <= 0 || d < c || b < 0 || width < 0 || slots < 0) return -1;
  const int64_t tokens = (ROW_TARGET + nh - 1) / nh; /* new tokens a work item */
  int64_t items = 0;
  for (int64_t s = 0; s < b; s++) {
    if (q_len[s] <= 0 || q_start[s] < 0 || q_start[s] + q_len[s] > t || k_len[s] < q_len[s] || k_len[s] > width)
      return -2;
    for (int64_t k = 0; k < k_len[s]; k++)
      if (key_slots[s * width + k] < 0 || key_slots[s * width + k] >= slots) return -3;
    items += (q_len[s] + tokens - 1) / tokens;
  }
  item_t *list = malloc((items ? items : 1) * sizeof(item_t));
  if (!list) return -4;
  int64_t n = 0;
  for (int64_t s = 0; s < b; s++)
    for (int64_t t0 = 0; t0 < q_len[s]; t0 += tokens)
      list[n++] = (item_t){s, t0, t0 + tokens < q_len[s] ? t0 + tokens : q_len[s]};
  const args_t a = {q_lat, q_pe, cache, lat_ts, lat_hs, pe_ts, pe_hs, key_slots, nh, c, d, width, scale,
                    out, out_ts, out_hs};
  const int64_t rp = (tokens * nh + RB - 1) / RB * RB;
  int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
  {
    scratch_t w;
    /* rp is a multiple of RB and KB even: the int64 limits after the floats stay 8-byte aligned */
    char *mem = malloc(((rp * d + rp * KB + d * KB + rp * c + 2 * rp) * sizeof(float)) + rp * sizeof(int64_t));
    if (mem) {
      w.q = (float *)mem;
      w.s = w.q + rp * d;
      w.kt = w.s + rp * KB;
      w.acc = w.kt + d * KB;
      w.m = w.acc + rp * c;
      w.l = w.m + rp;
      w.lim = (int64_t *)(w.l + rp);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; i++) {
      if (mem)
        run_item(&a, q_start, q_len, k_len, &list[i], &w);
      else
        failed = 1;
    }
    free(mem);
  }
  free(list);
  return failed ? -4 : 0;
}
