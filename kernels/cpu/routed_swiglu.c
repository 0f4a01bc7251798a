/* Routed-expert SwiGLU on the CPU over (token, expert) pairs grouped by expert: only the routed products,
 * each weight row read once per group of 4 tokens, no per-expert call overhead. Called through ctypes by
 * kernels/cpu_routed.py (which builds this file with the machine's C compiler).
 *
 * x [T, H] fp32. A layer's stacked expert weights, of one kind:
 *   EM_F32, EM_BF16 (raw 16-bit words): gate [R, I, H] and up [R, I, H], `stride` elements from one expert's
 *     rows to the next's (I * H, or 2 * I * H for the two halves of one [R, 2I, H] gate_up stack), down [R, H, I];
 *   EM_E4M3 (raw bytes) with fp32 128x128 block scales gate_s, up_s [R, ceil(I/128), ceil(H/128)], down_s
 *     [R, ceil(H/128), ceil(I/128)]: each weight is e4m3 * scale rounded to fp32 once, the very value a
 *     dequantized fp32 copy holds, computed as it is read (a quarter of the bytes of fp32).
 * Pairs p: token[p] through stack row row[p] with routing weight pw[p], in any order (grouped by row here).
 * out [T, H] fp32 (zeroed by the caller) += sum over the token's pairs of pw * down(silu(gate(x)) * up(x)).
 * Work is split over weight rows (output columns), so threads never write the same element: phase 1 the 2I
 * gate/up rows, phase 2 the H down rows. Dot products accumulate in fp32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

enum { EM_F32 = 0, EM_BF16 = 1, EM_E4M3 = 2 };

static inline float scalar_w(int kind, const void *w, const float *sc, int64_t k) {
  uint32_t u;
  float f;
  switch (kind) {
    case EM_BF16:
      u = (uint32_t)((const uint16_t *)w)[k] << 16;
      memcpy(&f, &u, 4);
      return f;
    case EM_E4M3:
      return e4m3_value(((const uint8_t *)w)[k]) * sc[k >> 7];
    default:
      return ((const float *)w)[k];
  }
}


/* Up to 4 weight rows of one kind: their starts, and for e4m3 their rows of block scales. */
typedef struct {
  const void *w[4];
  const float *sc[4];
} rows_t;

/* LOAD(p, k, s): VW weights from row p at k as fp32; s: the row's block-scale vector (e4m3 only) for k's 128-block,
 * made once per block by SCALE. e4m3: (the value / 2^8) * (scale * 2^8), the one rounding of value * scale (exact
 * powers of two: scales are checked to leave scale * 2^8 finite, kernels/cpu_routed.py) */
#define LOAD_F32(p, k, s) load_f32((const float *)(p) + (k))
#define LOAD_BF16(p, k, s) load_bf16((const uint16_t *)(p) + (k))
#define LOAD_E4M3(p, k, s) (load_e4m3_div256((const uint8_t *)(p) + (k)) * (s))
#define SCALE_NONE(sc, k) ((vf){0})
#define SCALE_E4M3(sc, k) splat((sc)[(k) >> 7] * 0x1p8f)

/* res[r * 4 + q] = dot(row r, vector q) over n values, for NR rows and NQ vectors (acc stays in registers) */
#define DOTS(NAME, KIND, LOAD, SCALE, NR, NQ)                                                    \
  static void NAME(const rows_t *rw, int64_t n, const float *const *v, float *res) {             \
    vf acc[NR][NQ];                                                                              \
    for (int r = 0; r < NR; r++)                                                                 \
      for (int q = 0; q < NQ; q++) acc[r][q] = (vf){0};                                          \
    int64_t k = 0;                                                                               \
    while (k + VW <= n) { /* 128-blocks: a block scale per row made once */                     \
      const int64_t block_end = (k | 127) + 1 < n ? (k | 127) + 1 : n;                           \
      vf s[NR];                                                                                  \
      for (int r = 0; r < NR; r++) s[r] = SCALE(rw->sc[r], k);                                   \
      for (; k + VW <= block_end; k += VW) {                                                     \
        vf wr[NR];                                                                               \
        for (int r = 0; r < NR; r++) wr[r] = LOAD(rw->w[r], k, s[r]);                            \
        for (int q = 0; q < NQ; q++) {                                                           \
          const vf xq = load_f32(v[q] + k);                                                      \
          for (int r = 0; r < NR; r++) acc[r][q] += wr[r] * xq;                                  \
        }                                                                                        \
      }                                                                                          \
      if (k < block_end) break; /* fewer than VW values left: the scalar tail */                \
    }                                                                                            \
    for (int r = 0; r < NR; r++)                                                                 \
      for (int q = 0; q < NQ; q++) {                                                             \
        float s = hsum(acc[r][q]);                                                               \
        for (int64_t j = k; j < n; j++) s = fmaf(scalar_w(KIND, rw->w[r], rw->sc[r], j), v[q][j], s); \
        res[r * 4 + q] = s;                                                                      \
      }                                                                                          \
  }

/* rows per block by kind: fp32 one at a time (blocks of 2 and 4 measured slower), the converted kinds in fours */
#define DOTS_KIND(KIND, LOAD, SCALE, NR)      \
  DOTS(KIND##_1, KIND, LOAD, SCALE, NR, 1)     \
  DOTS(KIND##_2, KIND, LOAD, SCALE, NR, 2)     \
  DOTS(KIND##_3, KIND, LOAD, SCALE, NR, 3)     \
  DOTS(KIND##_4, KIND, LOAD, SCALE, NR, 4)     \
  DOTS(KIND##_tail, KIND, LOAD, SCALE, 1, 1)
DOTS_KIND(EM_F32, LOAD_F32, SCALE_NONE, 1)
DOTS_KIND(EM_BF16, LOAD_BF16, SCALE_NONE, 4)
DOTS_KIND(EM_E4M3, LOAD_E4M3, SCALE_E4M3, 4)

typedef void (*dots_fn)(const rows_t *, int64_t, const float *const *, float *);
static const int ROWS[3] = {1, 4, 4};
static const dots_fn BLOCK[3][5] = {
    {0, EM_F32_1, EM_F32_2, EM_F32_3, EM_F32_4},
    {0, EM_BF16_1, EM_BF16_2, EM_BF16_3, EM_BF16_4},
    {0, EM_E4M3_1, EM_E4M3_2, EM_E4M3_3, EM_E4M3_4},
};
static const dots_fn TAIL[3] = {EM_F32_tail, EM_BF16_tail, EM_E4M3_tail};

/* nr (<= 4) rows against nq (<= 4) vectors: in blocks of the kind's row count, then row by row */
static void block_dots(int kind, const rows_t *rw, int nr, int64_t n, const float *const *v, int nq, float *res) {
  int r = 0;
  if (nr == 4 || ROWS[kind] == 1)
    for (; r + ROWS[kind] <= nr; r += ROWS[kind]) {
      rows_t part = *rw;
      for (int a = 0; a < ROWS[kind]; a++) part.w[a] = rw->w[r + a], part.sc[a] = rw->sc[r + a];
      BLOCK[kind][nq](&part, n, v, res + r * 4);
    }
  for (; r < nr; r++)
    for (int q = 0; q < nq; q++) {
      rows_t one = {{rw->w[r]}, {rw->sc[r]}};
      TAIL[kind](&one, n, v + q, res + r * 4 + q);
    }
}

typedef struct {
  int kind;
  const float *x;
  const void *gate, *up, *down;
  const float *gate_s, *up_s, *down_s;
  int64_t stride, h, i, groups;
  const int64_t *start, *count, *row, *token;
  float *gu, *hbuf, *out;
  int phase;       /* 0: gate/up rows into gu; 1: down rows into out */
  int64_t r0, r1;  /* this part's weight rows */
} job_t;

static size_t elem_size(int kind) { return kind == EM_F32 ? 4 : kind == EM_BF16 ? 2 : 1; }

/* weight row r of stack row e: phase 0 rows [0, I) gate, [I, 2I) up, each [H]; phase 1 down rows [I] */
static void row_of(const job_t *j, int64_t e, int64_t r, const void **w, const float **sc) {
  const size_t es = elem_size(j->kind);
  const int64_t h = j->h, i = j->i, hb = (h + 127) / 128, ib = (i + 127) / 128;
  if (j->phase == 0) {
    const int up = r >= i;
    const int64_t rr = up ? r - i : r;
    *w = (const char *)(up ? j->up : j->gate) + ((size_t)e * j->stride + rr * h) * es;
    if (j->kind == EM_E4M3) *sc = (up ? j->up_s : j->gate_s) + ((size_t)e * ib + rr / 128) * hb;
  } else {
    *w = (const char *)j->down + ((size_t)e * h + r) * i * es;
    if (j->kind == EM_E4M3) *sc = j->down_s + ((size_t)e * hb + r / 128) * ib;
  }
}

static void run(const job_t *j) {
  const int64_t h = j->h, i2 = 2 * j->i, n = j->phase == 0 ? h : j->i;
  const float *v[4];
  float res[16];
  for (int64_t g = 0; g < j->groups; g++) {
    const int64_t s = j->start[g], c = j->count[g], e = j->row[g];
    for (int64_t p0 = s; p0 < s + c; p0 += 4) {
      const int nq = (int)(s + c - p0 < 4 ? s + c - p0 : 4);
      for (int q = 0; q < nq; q++) v[q] = j->phase == 0 ? j->x + j->token[p0 + q] * h : j->hbuf + (p0 + q) * j->i;
      for (int64_t r = j->r0; r < j->r1; r += 4) {
        const int nr = (int)(j->r1 - r < 4 ? j->r1 - r : 4);
        rows_t rw = {{0}, {0}};
        for (int a = 0; a < nr; a++) row_of(j, e, r + a, &rw.w[a], &rw.sc[a]);
        if (j->kind != EM_F32) { /* the next block's rows, fetched while this one computes (fp32: no gain) */
          const size_t bytes = (size_t)nr * n * elem_size(j->kind);
          for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)rw.w[0] + bytes + b);
        }
        block_dots(j->kind, &rw, nr, n, v, nq, res);
        for (int a = 0; a < nr; a++)
          for (int q = 0; q < nq; q++) {
            if (j->phase == 0)
              j->gu[(p0 + q) * i2 + r + a] = res[a * 4 + q];
            else
              j->out[j->token[p0 + q] * h + r + a] += res[a * 4 + q];
          }
      }
    }
  }
}

#define MAX_THREADS 256

/* rows split on multiples of 4, so that every part runs the 4-row kernels */
static int split(const job_t *base, int64_t rows, int threads, job_t *jobs) {
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads > rows / 4) threads = (int)(rows / 4);
  if (threads < 1) threads = 1;
  for (int t = 0; t < threads; t++) {
    jobs[t] = *base;
    jobs[t].r0 = (rows / 4 * t / threads) * 4;
    jobs[t].r1 = t == threads - 1 ? rows : (rows / 4 * (t + 1) / threads) * 4;
  }
  return threads;
}

/* On torch's own libgomp (this file is built with -fopenmp and loaded after torch, so the loader resolves
 * libgomp.so.1 to torch's copy): the parts run on torch's worker threads (a second pool of threads would compete
 * with torch's spinning workers for the same cores) */
static void parallel(const job_t *base, int64_t rows, int threads) {
  job_t jobs[MAX_THREADS];
  threads = split(base, rows, threads, jobs);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; t++) run(&jobs[t]);
}

/* 1 where load_e4m3 converts through fp16 in hardware (simd.h), 0 where it runs the bit-manipulating fallback */
int em_e4m3_fast(void) {
#if defined(__AVX512F__) || defined(__F16C__)
  return 1;
#else
  return 0;
#endif
}

/* Error codes (the caller names what was wrong) */
enum { EM_OK = 0, EM_BAD_KIND = -1, EM_BAD_TOKEN = -2, EM_BAD_ROW = -3, EM_NO_MEMORY = -4 };

/* Scratch of the calling thread, grown as needed and kept (a fresh allocation of this size is a fresh mapping
 * whose pages fault in on every call). */
static __thread char *scratch;
static __thread size_t scratch_size;

static void *scratch_of(size_t bytes) {
  if (bytes > scratch_size) {
    char *grown = realloc(scratch, bytes);
    if (!grown) return 0;
    scratch = grown, scratch_size = bytes;
  }
  return scratch;
}

/* The pairs in any order: pair p is token[p] through stack row row[p] (of R) with weight pw[p]. They are
 * grouped by stack row here (a stable counting sort), after checking every index. */
int em_routed_swiglu(int kind, const float *x, int64_t tokens, const void *gate, const void *up, const void *down,
                     const float *gate_s, const float *up_s, const float *down_s, int64_t stride, int64_t h,
                     int64_t i, int64_t r, const int64_t *token, const int64_t *row, const float *pw, int64_t pairs,
                     float *out, int threads) {
  if (kind < EM_F32 || kind > EM_E4M3) return EM_BAD_KIND;
  for (int64_t p = 0; p < pairs; p++) {
    if (token[p] < 0 || token[p] >= tokens) return EM_BAD_TOKEN;
    if (row[p] < 0 || row[p] >= r) return EM_BAD_ROW;
  }
  const size_t n_first = (size_t)r + 1, n_groups = 3 * ((size_t)r + 1), n_pairs = (size_t)pairs;
  const size_t bytes = (n_first + n_groups + n_pairs) * sizeof(int64_t) + (n_pairs * (3 * i + 1)) * sizeof(float);
  char *mem = scratch_of(bytes);
  if (!mem) return EM_NO_MEMORY;
  int64_t *first = (int64_t *)mem;                   /* [R + 1] first sorted pair of each row */
  int64_t *start = first + n_first;                  /* [G] x 3: start, count, row of each group */
  int64_t *sorted_token = start + n_groups;          /* [P] */
  float *sorted_pw = (float *)(sorted_token + n_pairs);  /* [P] */
  float *gu = sorted_pw + n_pairs;                   /* [P, 2I] */
  float *hbuf = gu + n_pairs * 2 * i;                /* [P, I] */
  memset(first, 0, n_first * sizeof *first);
  for (int64_t p = 0; p < pairs; p++) first[row[p] + 1]++;
  for (int64_t e = 0; e < r; e++) first[e + 1] += first[e];
  int64_t *count = start + r + 1, *group_row = count + r + 1, groups = 0;
  for (int64_t e = 0; e < r; e++)
    if (first[e + 1] > first[e]) {
      start[groups] = first[e], count[groups] = first[e + 1] - first[e], group_row[groups] = e;
      groups++;
    }
  for (int64_t p = 0; p < pairs; p++) { /* first[] becomes the next free place of each row */
    const int64_t at = first[row[p]]++;
    sorted_token[at] = token[p], sorted_pw[at] = pw[p];
  }
  job_t j = {kind, x, gate, up, down, gate_s, up_s, down_s, stride, h, i, groups, start, count, group_row,
             sorted_token, gu, hbuf, out, 0, 0, 0};
  parallel(&j, 2 * i, threads);
  for (int64_t p = 0; p < pairs; p++) {
    const float *g = gu + p * 2 * i, *u = g + i;
    float *hp = hbuf + p * i;
    for (int64_t k = 0; k < i; k++) hp[k] = g[k] / (1.f + expf(-g[k])) * u[k] * sorted_pw[p];
  }
  j.phase = 1;
  parallel(&j, h, threads);
  return EM_OK;
}
