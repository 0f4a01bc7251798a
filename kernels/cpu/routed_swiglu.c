/* Routed-expert SwiGLU on the CPU over (token, expert) pairs grouped by expert: only the routed products,
 * each weight row read once per group, no per-expert call overhead. Called through ctypes by
 * kernels/cpu_routed.py (which builds this file with the machine's C compiler).
 *
 * x [T, H] fp32; weights of a layer's stack, fp32 or bf16 (raw 16-bit words):
 *   gate_up [R, 2I, H] (gate rows, then up rows), down [R, H, I];
 * groups g = 0..G-1: pairs start[g] .. start[g] + count[g] - 1 go through stack row row[g];
 * pair p: token[p], routing weight pw[p]. out [T, H] fp32 (zeroed by the caller) += sum over the token's pairs
 * of pw * down(silu(gate(x)) * up(x)). Scratch: gu [P, 2I], h [P, I].
 * Work is split over weight rows (the output columns), so threads never write the same element: phase 1 the
 * 2I gate/up rows, phase 2 the H down rows. Each dot product accumulates in fp32.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4)));

static inline vf load_f32(const float *p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}

typedef uint16_t vh __attribute__((vector_size(VW * 2)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

static inline vf load_bf16(const uint16_t *p) { /* bf16 is the top half of an fp32 */
  vh w;
  memcpy(&w, p, sizeof w);
  vu u = __builtin_convertvector(w, vu) << 16;
  vf v;
  memcpy(&v, &u, sizeof v);
  return v;
}

static inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; i++) s += v[i];
  return s;
}

static inline float scalar_w(const void *w, int bf16, int64_t k) {
  if (bf16) {
    uint32_t u = (uint32_t)((const uint16_t *)w)[k] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  return ((const float *)w)[k];
}

/* res[r * 4 + q] = dot(weight row r, vector q), for nr (<= 4) consecutive rows of length n and nq (<= 4)
 * vectors. Rows of 16-bit words when bf16. */
static void dots(const void *w, int bf16, int64_t n, int nr, const float *const *v, int nq, float *res) {
  vf acc[4][4];
  memset(acc, 0, sizeof acc);
  int64_t k = 0;
  for (; k + VW <= n; k += VW) {
    vf wr[4], xv[4];
    for (int r = 0; r < nr; r++)
      wr[r] = bf16 ? load_bf16((const uint16_t *)w + r * n + k) : load_f32((const float *)w + r * n + k);
    for (int q = 0; q < nq; q++) xv[q] = load_f32(v[q] + k);
    for (int r = 0; r < nr; r++)
      for (int q = 0; q < nq; q++) acc[r][q] += wr[r] * xv[q];
  }
  for (int r = 0; r < nr; r++) {
    const void *row = bf16 ? (const void *)((const uint16_t *)w + r * n) : (const void *)((const float *)w + r * n);
    for (int q = 0; q < nq; q++) {
      float s = hsum(acc[r][q]);
      for (int64_t j = k; j < n; j++) s += scalar_w(row, bf16, j) * v[q][j];
      res[r * 4 + q] = s;
    }
  }
}

/* The same specialised for NR rows, NQ vectors and the weight type (the hot loop: acc stays in registers). */
#define DOTS(NAME, WT, LOAD, NR, NQ)                                                                        \
  static void NAME(const void *w_, int64_t n, const float *const *v, float *res) {                          \
    const WT *w = (const WT *)w_;                                                                           \
    vf acc[NR][NQ];                                                                                         \
    for (int r = 0; r < NR; r++)                                                                            \
      for (int q = 0; q < NQ; q++) acc[r][q] = (vf){0};                                                     \
    int64_t k = 0;                                                                                          \
    for (; k + VW <= n; k += VW) {                                                                          \
      vf wr[NR];                                                                                            \
      for (int r = 0; r < NR; r++) wr[r] = LOAD(w + r * n + k);                                             \
      for (int q = 0; q < NQ; q++) {                                                                        \
        const vf xq = load_f32(v[q] + k);                                                                   \
        for (int r = 0; r < NR; r++) acc[r][q] += wr[r] * xq;                                               \
      }                                                                                                     \
    }                                                                                                       \
    for (int r = 0; r < NR; r++)                                                                            \
      for (int q = 0; q < NQ; q++) {                                                                        \
        float s = hsum(acc[r][q]);                                                                          \
        for (int64_t j = k; j < n; j++) s += scalar_w(w + r * n, sizeof(WT) == 2, j) * v[q][j];             \
        res[r * 4 + q] = s;                                                                                 \
      }                                                                                                     \
  }
/* rows per block: fp32 rows one at a time (blocks of 2 and 4 rows measured slower), bf16 rows in fours (their
 * conversion shared by the vectors) */
#define F32_ROWS 1
#define BF16_ROWS 4
DOTS(f32_1, float, load_f32, F32_ROWS, 1)
DOTS(f32_2, float, load_f32, F32_ROWS, 2)
DOTS(f32_3, float, load_f32, F32_ROWS, 3)
DOTS(f32_4, float, load_f32, F32_ROWS, 4)
DOTS(bf16_1, uint16_t, load_bf16, BF16_ROWS, 1)
DOTS(bf16_2, uint16_t, load_bf16, BF16_ROWS, 2)
DOTS(bf16_3, uint16_t, load_bf16, BF16_ROWS, 3)
DOTS(bf16_4, uint16_t, load_bf16, BF16_ROWS, 4)

typedef void (*dots_fn)(const void *, int64_t, const float *const *, float *);
static const dots_fn DOTS_F32[5] = {0, f32_1, f32_2, f32_3, f32_4};
static const dots_fn DOTS_BF16[5] = {0, bf16_1, bf16_2, bf16_3, bf16_4};

/* nr (<= 4) rows from w, in blocks of the type's row count (the kernel's) or one at a time for a tail */
static void block_dots(const void *w, int bf16, int64_t n, int nr, const float *const *v, int nq, float *res) {
  const int rows = bf16 ? BF16_ROWS : F32_ROWS;
  const size_t esz = bf16 ? 2 : 4;
  int r = 0;
  for (; r + rows <= nr; r += rows)
    (bf16 ? DOTS_BF16 : DOTS_F32)[nq]((const char *)w + r * n * esz, n, v, res + r * 4);
  if (r < nr) dots((const char *)w + r * n * esz, bf16, n, nr - r, v, nq, res + r * 4);
}

typedef struct {
  const float *x;
  const void *gate_up, *down;
  int bf16;
  int64_t h, i, groups;
  const int64_t *start, *count, *row, *token;
  float *gu, *hbuf, *out;
  int phase;       /* 0: gate/up rows into gu; 1: down rows into out */
  int64_t r0, r1;  /* this thread's weight rows */
} job_t;

static void *run(void *arg) {
  const job_t *j = (const job_t *)arg;
  const int64_t h = j->h, i2 = 2 * j->i, n = j->phase == 0 ? h : j->i;
  const size_t esz = j->bf16 ? 2 : 4;
  const float *v[4];
  float res[16];
  for (int64_t g = 0; g < j->groups; g++) {
    const int64_t s = j->start[g], c = j->count[g], stack_row = j->row[g];
    for (int64_t p0 = s; p0 < s + c; p0 += 4) {
      const int nq = (int)(s + c - p0 < 4 ? s + c - p0 : 4);
      for (int q = 0; q < nq; q++) v[q] = j->phase == 0 ? j->x + j->token[p0 + q] * h : j->hbuf + (p0 + q) * j->i;
      for (int64_t r = j->r0; r < j->r1; r += 4) {
        const int nr = (int)(j->r1 - r < 4 ? j->r1 - r : 4);
        const char *w = j->phase == 0 ? (const char *)j->gate_up + ((size_t)stack_row * i2 + r) * h * esz
                                      : (const char *)j->down + ((size_t)stack_row * h + r) * j->i * esz;
        block_dots(w, j->bf16, n, nr, v, nq, res);
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
  return 0;
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

#ifdef _OPENMP
/* OpenMP: loaded after torch, this resolves to torch's own libgomp, so the parts run on torch's worker threads
 * (a second pool of threads would compete with torch's spinning workers for the same cores) */
static void parallel(const job_t *base, int64_t rows, int threads) {
  job_t jobs[MAX_THREADS];
  threads = split(base, rows, threads, jobs);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; t++) run(&jobs[t]);
}
#else
static void parallel(const job_t *base, int64_t rows, int threads) {
  job_t jobs[MAX_THREADS];
  pthread_t th[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  threads = split(base, rows, threads, jobs);
  for (int t = 1; t < threads; t++) started[t] = pthread_create(&th[t], 0, run, &jobs[t]) == 0;
  run(&jobs[0]);
  for (int t = 1; t < threads; t++) {
    if (started[t])
      pthread_join(th[t], 0);
    else
      run(&jobs[t]); /* no thread to be had: this one does the part */
  }
}
#endif

int em_routed_swiglu(const float *x, const void *gate_up, const void *down, int bf16, int64_t h, int64_t i,
                     int64_t groups, const int64_t *start, const int64_t *count, const int64_t *row,
                     const int64_t *token, const float *pair_weight, int64_t pairs, float *gu, float *hbuf,
                     float *out, int threads) {
  job_t j = {x, gate_up, down, bf16, h, i, groups, start, count, row, token, gu, hbuf, out, 0, 0, 0};
  parallel(&j, 2 * i, threads);
  for (int64_t p = 0; p < pairs; p++) {
    const float *g = gu + p * 2 * i, *u = g + i;
    float *hp = hbuf + p * i;
    for (int64_t k = 0; k < i; k++) hp[k] = g[k] / (1.f + expf(-g[k])) * u[k] * pair_weight[p];
  }
  j.phase = 1;
  parallel(&j, h, threads);
  return 0;
}
