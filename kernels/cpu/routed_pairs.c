/* A layer's routed (token, expert, weight) pairs on their way to the expert pools and in, one pass each.
 * Called through ctypes by kernels/cpu_pairs.py, which falls back to torch where this is not built.
 *
 * em_split_pairs (gateway): pairs p (token[p] a row of the batch's T rows, expert[p], weight[p]) and the pool
 *   owner[p] in [0, n_owners) each goes to -> grouped by owner, in their order within each owner:
 *   pairs_of[o] and rows_of[o] (owner o's pairs and distinct rows); token_out, expert_out, weight_out [P] the
 *   pairs owner by owner; packed [P, 2] int32 (the pair's row among its owner's rows, expert); rows [P]: the
 *   owners' batch rows, owner by owner (rows_of[o] each, in order of first appearance), then unused.
 *   -2: a token out of [0, T); -3: an owner out of range or an expert beyond int32; -4: no memory.
 * em_check_pairs (pool): packed [P, 2] int32 (row, expert) and weight [P] as they came over the wire ->
 *   token, expert [P] int64 and weight_out [P], when every row is in [0, n_rows), every expert in
 *   [0, n_experts) and held there (held[e] != 0; held NULL: not asked) and every weight finite; else 1 and the
 *   caller finds what is wrong (its checks name it).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int em_split_pairs(const int64_t *token, const int64_t *expert, const float *weight, const int64_t *owner,
                   int64_t n_pairs, int64_t n_tokens, int64_t n_owners, int64_t *pairs_of, int64_t *rows_of,
                   int64_t *token_out, int64_t *expert_out, float *weight_out, int32_t *packed, int64_t *rows) {
  if (n_pairs < 0 || n_tokens < 0 || n_owners <= 0) return -1;
  for (int64_t o = 0; o < n_owners; o++) pairs_of[o] = rows_of[o] = 0;
  for (int64_t p = 0; p < n_pairs; p++) {
    if (owner[p] < 0 || owner[p] >= n_owners || expert[p] < 0 || expert[p] > INT32_MAX) return -3;
    if (token[p] < 0 || token[p] >= n_tokens) return -2;
    pairs_of[owner[p]]++;
  }
  int64_t *next = malloc(sizeof(int64_t) * (size_t)(n_owners + 2 * n_tokens + 1));
  if (!next) return -4;
  int64_t *seen = next + n_owners, *local = seen + n_tokens; /* per token: the owner it was last given a row
                                                                  for, and that row */
  for (int64_t o = 0, at = 0; o < n_owners; o++) {
    next[o] = at;
    at += pairs_of[o];
  }
  for (int64_t p = 0; p < n_pairs; p++) {
    const int64_t d = next[owner[p]]++;
    token_out[d] = token[p];
    expert_out[d] = expert[p];
    weight_out[d] = weight[p];
  }
  for (int64_t t = 0; t < n_tokens; t++) seen[t] = -1;
  for (int64_t o = 0, start = 0, row0 = 0; o < n_owners; start += pairs_of[o], row0 += rows_of[o], o++) {
    for (int64_t d = start; d < start + pairs_of[o]; d++) {
      const int64_t t = token_out[d];
      if (seen[t] != o) {
        seen[t] = o;
        local[t] = rows_of[o];
        rows[row0 + rows_of[o]++] = t;
      }
      packed[2 * d] = (int32_t)local[t];
      packed[2 * d + 1] = (int32_t)expert_out[d];
    }
  }
  free(next);
  return 0;
}

int em_check_pairs(const int32_t *packed, const float *weight, int64_t n_pairs, int64_t n_rows, int64_t n_experts,
                   const uint8_t *held, int64_t *token, int64_t *expert, float *weight_out) {
  if (n_pairs < 0) return -1;
  uint32_t bad = 0;
  for (int64_t p = 0; p < n_pairs; p++) {
    const int64_t r = packed[2 * p], e = packed[2 * p + 1];
    uint32_t w;
    memcpy(&w, weight + p, 4);
    bad |= (r < 0) | (r >= n_rows) | (e < 0) | (e >= n_experts) | ((w & 0x7F800000u) == 0x7F800000u);
    token[p] = r;
    expert[p] = e;
    weight_out[p] = weight[p];
  }
  if (bad) return 1;
  if (held)
    for (int64_t p = 0; p < n_pairs; p++)
      if (!held[expert[p]]) return 1;
  return 0;
}
