/* Fused CPU loops for the hook's hot path (see kernels.py, which compiles and loads this file).

   On a CPU the hook is bound by memory passes and by the fixed cost of each
   tensor call. These loops do in one pass what the PyTorch path does in
   several, with the same float32 arithmetic, so both paths give bit-identical
   results:

   - accumulate_topk: compression.py's sampled top-k of acc = grad + residual
     with the accumulation fused in. The sample is added first (a few thousand
     entries), which gives the threshold; then one pass writes acc, zeroes grad
     (it becomes the sparse update) and keeps the positions above the
     threshold while acc is still in registers, so acc is never read back;
   - topk_sampled: the same selection of a tensor already accumulated;
   - accumulate: the pass alone, for buckets too small to sample;
   - scatter_add_rows, clear_at, finite_at: the decoding of what every peer
     sent, and the finite check, at the sent positions only.

   Magnitudes compare as integers: with the sign bit cleared, a float32's bits
   order exactly as its magnitude does (inf above every finite value, NaN
   above inf), as compression.py's PyTorch path compares them. Built with
   -ffp-contract=off, so no multiply-add is fused and rounding matches
   PyTorch's. Vectors use GCC's vector extensions (GCC and Clang), not one
   instruction set's intrinsics, but for SSE2's movemask where the compiler
   targets it (x86-64); elsewhere a portable line stands in for it. */

#include <stdint.h>
#include <string.h>

#define MAGNITUDE 0x7fffffff
#define EXPONENT 0x7f800000

typedef int32_t v4i __attribute__((vector_size(16)));
typedef float v4f __attribute__((vector_size(16)));

#if defined(__SSE2__)
#include <emmintrin.h>
/* Bit i set where lane i is all ones. */
static inline int lanes_set(v4i lanes) { return _mm_movemask_ps((__m128)lanes); }
#else
static inline int lanes_set(v4i lanes) { return (lanes[0] & 1) | (lanes[1] & 2) | (lanes[2] & 4) | (lanes[3] & 8); }
#endif

/* For each 4-bit mask, the offsets of its set bits packed to the front, and how many there are:
   appending the positions that passed is one vector store and one add, with no branch. */
static const v4i PACKED[16] = {{0}, {0}, {1}, {0, 1}, {2}, {0, 2}, {1, 2}, {0, 1, 2}, {3}, {0, 3}, {1, 3}, {0, 1, 3},
                               {2, 3}, {0, 2, 3}, {1, 2, 3}, {0, 1, 2, 3}};
static const int8_t SET[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};

/* Entries tested together: a group with none above the threshold costs one vector compare and
   one well-predicted branch; most groups have none, as only about 1% of entries pass. */
#define GROUP 16

/* Append to found the positions base + i (i < 4) set in mask. found has room for capacity + 4
   entries; past capacity only *count grows (the caller falls back). */
static inline void append(int mask, int32_t base, int32_t *restrict found, int64_t capacity, int64_t *count)
{
    if (*count <= capacity) {
        v4i at = PACKED[mask] + base;
        memcpy(found + *count, &at, sizeof at);
    }
    *count += SET[mask];
}

/* Lanes of x[j, j + 4) whose magnitude bits exceed limit's: all ones there, zero elsewhere. */
static inline v4i above(const float *x, int64_t j, v4i limit)
{
    const v4i magnitude = {MAGNITUDE, MAGNITUDE, MAGNITUDE, MAGNITUDE};
    v4i bits;
    memcpy(&bits, x + j, sizeof bits);
    return (bits & magnitude) > limit;
}

/* append the positions base + i (i < 16) set in the four lane masks: one test for the whole group. */
static inline void keep(v4i a0, v4i a1, v4i a2, v4i a3, int32_t base, int32_t *restrict found, int64_t capacity,
                        int64_t *count)
{
    if (!lanes_set(a0 | a1 | a2 | a3)) return;
    append(lanes_set(a0), base, found, capacity, count);
    append(lanes_set(a1), base + 4, found, capacity, count);
    append(lanes_set(a2), base + 8, found, capacity, count);
    append(lanes_set(a3), base + 12, found, capacity, count);
}

/* keep for one entry, for the last n % GROUP. */
static inline void keep_one(float x, int32_t limit, int32_t position, int32_t *restrict found, int64_t capacity,
                            int64_t *count)
{
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if (*count <= capacity) found[*count] = position;
    *count += (bits & MAGNITUDE) > limit;
}

/* Positions of x[0, n) whose magnitude bits exceed threshold, in order, written to found (room for
   capacity + 4); returns how many there are (more than capacity: found holds only some). */
static int64_t filter_above(const float *x, int64_t n, int32_t threshold, int32_t *restrict found, int64_t capacity)
{
    const v4i limit = {threshold, threshold, threshold, threshold};
    int64_t count = 0, j = 0;
    for (; j + GROUP <= n; j += GROUP)
        keep(above(x, j, limit), above(x, j + 4, limit), above(x, j + 8, limit), above(x, j + 12, limit), (int32_t)j,
             found, capacity, &count);
    for (; j < n; j++) keep_one(x[j], threshold, (int32_t)j, found, capacity, &count);
    return count;
}

/* acc[j, j + 4) = grad + residual and grad zeroed there; above() of the sums. */
static inline v4i add_above(float *restrict grad, const float *restrict residual, float *restrict acc, int64_t j,
                            v4i limit)
{
    const v4i magnitude = {MAGNITUDE, MAGNITUDE, MAGNITUDE, MAGNITUDE};
    const v4f zero = {0.0f, 0.0f, 0.0f, 0.0f};
    v4f g, r;
    memcpy(&g, grad + j, sizeof g);
    memcpy(&r, residual + j, sizeof r);
    v4f sum = g + r;
    memcpy(acc + j, &sum, sizeof sum);
    memcpy(grad + j, &zero, sizeof zero);
    return ((v4i)sum & magnitude) > limit;
}

/* acc = grad + residual and grad = 0 over n entries, and filter_above's positions of acc: one pass. */
static int64_t accumulate_filter(float *restrict grad, const float *restrict residual, float *restrict acc, int64_t n,
                                 int32_t threshold, int32_t *restrict found, int64_t capacity)
{
    const v4i limit = {threshold, threshold, threshold, threshold};
    int64_t count = 0, j = 0;
    for (; j + GROUP <= n; j += GROUP)
        keep(add_above(grad, residual, acc, j, limit), add_above(grad, residual, acc, j + 4, limit),
             add_above(grad, residual, acc, j + 8, limit), add_above(grad, residual, acc, j + 12, limit), (int32_t)j,
             found, capacity, &count);
    for (; j < n; j++) {
        acc[j] = grad[j] + residual[j];
        grad[j] = 0.0f;
        keep_one(acc[j], threshold, (int32_t)j, found, capacity, &count);
    }
    return count;
}

/* acc = grad + residual and grad = 0 over n entries. */
void accumulate(float *restrict grad, const float *restrict residual, float *restrict acc, int64_t n)
{
    for (int64_t j = 0; j < n; j++) {
        acc[j] = grad[j] + residual[j];
        grad[j] = 0.0f;
    }
}

/* The nth smallest (0-based) of v[0, m), partially reordering v: quickselect with a three-way
   partition (many equal values, such as zeros, cost one pass) around a pseudo-random pivot drawn
   from a fixed seed, so any input order is fast on average and the result never depends on luck. */
static int32_t nth_smallest(int32_t *v, int64_t m, int64_t nth)
{
    uint64_t state = 0x9e3779b97f4a7c15u;
    int64_t lo = 0, hi = m - 1;
    while (lo < hi) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;
        int32_t pivot = v[lo + (int64_t)(state % (uint64_t)(hi - lo + 1))];
        int64_t lt = lo, i = lo, gt = hi;
        while (i <= gt) {
            int32_t value = v[i];
            if (value < pivot) {
                v[i++] = v[lt];
                v[lt++] = value;
            } else if (value > pivot) {
                v[i] = v[gt];
                v[gt--] = value;
            } else {
                i++;
            }
        }
        if (nth < lt) hi = lt - 1;
        else if (nth > gt) lo = gt + 1;
        else return pivot;
    }
    return v[nth];
}

static int32_t magnitude_at(const float *x, int64_t i)
{
    int32_t bits;
    memcpy(&bits, x + i, sizeof bits);
    return bits & MAGNITUDE;
}

/* The sampled top-k once the first threshold's filter has run: count positions of x above
   threshold in found. sample holds the m sampled magnitudes (reordered here), rank_second the
   second threshold's rank in it; found has room for capacity + 4 positions, scratch for capacity
   magnitudes. On success writes the k chosen positions to indices and their values to values, and
   returns k: the positions above the k-th largest magnitude in order, then as many of those equal
   to it as fit, lowest first; or, when fewer than k are nonzero, every nonzero position then the
   first zeros. Returns -1 when both thresholds let fewer than k through, or more than capacity
   (the caller falls back). */
static int64_t choose(const float *x, int64_t n, int32_t *sample, int64_t m, int64_t rank_second, int32_t threshold,
                      int64_t count, int64_t k, int32_t *found, int32_t *scratch, int64_t capacity, int32_t *indices,
                      float *values)
{
    if (count < k && threshold != 0) {
        threshold = nth_smallest(sample, m, m - rank_second);
        count = filter_above(x, n, threshold, found, capacity);
    }
    if (count > capacity) return -1;
    int64_t chosen = 0;
    if (count >= k) {
        for (int64_t i = 0; i < count; i++) scratch[i] = magnitude_at(x, found[i]);
        int32_t kth = nth_smallest(scratch, count, count - k);
        int64_t above = 0;
        for (int64_t i = 0; i < count; i++) above += magnitude_at(x, found[i]) > kth;
        int64_t ties = k - above;
        for (int64_t i = 0; i < count; i++) {
            int32_t magnitude = magnitude_at(x, found[i]);
            if (magnitude > kth || (magnitude == kth && ties-- > 0)) indices[chosen++] = found[i];
        }
    } else if (threshold == 0) {
        for (int64_t i = 0; i < count; i++) indices[chosen++] = found[i];
        for (int64_t i = 0; i < n && chosen < k; i++)
            if (magnitude_at(x, i) == 0) indices[chosen++] = (int32_t)i;
    } else {
        return -1;
    }
    for (int64_t i = 0; i < chosen; i++) values[i] = x[indices[i]];
    return chosen;
}

/* compression.py's sampled top-k of x[0, n), in one call: sample holds the m sampled magnitudes,
   rank_first < rank_second the two thresholds' ranks in it; the rest as choose. */
int64_t topk_sampled(const float *x, int64_t n, int32_t *sample, int64_t m, int64_t rank_first, int64_t rank_second,
                     int64_t k, int32_t *found, int32_t *scratch, int64_t capacity, int32_t *indices, float *values)
{
    int32_t threshold = nth_smallest(sample, m, m - rank_first);
    int64_t count = filter_above(x, n, threshold, found, capacity);
    return choose(x, n, sample, m, rank_second, threshold, count, k, found, scratch, capacity, indices, values);
}

/* topk_sampled of acc = grad + residual, with grad zeroed: the m positions (int64) are summed into
   sample first, then one pass writes acc and grad and filters by the first threshold. acc is
   written in full even where this returns -1. */
int64_t accumulate_topk(float *restrict grad, const float *restrict residual, float *restrict acc, int64_t n,
                        const int64_t *positions, int32_t *sample, int64_t m, int64_t rank_first, int64_t rank_second,
                        int64_t k, int32_t *found, int32_t *scratch, int64_t capacity, int32_t *indices, float *values)
{
    for (int64_t i = 0; i < m; i++) {
        float sum = grad[positions[i]] + residual[positions[i]];
        memcpy(sample + i, &sum, sizeof sum);
        sample[i] &= MAGNITUDE;
    }
    int32_t threshold = nth_smallest(sample, m, m - rank_first);
    int64_t count = accumulate_filter(grad, residual, acc, n, threshold, found, capacity);
    return choose(acc, n, sample, m, rank_second, threshold, count, k, found, scratch, capacity, indices, values);
}

/* For each of the peers packed rows (k int32 indices, then k float32 values; each row
   row_bytes long): out[index] += value * scale, in order (as index_add_ adds), and every index
   copied to touched. */
void scatter_add_rows(float *out, const uint8_t *rows, int64_t peers, int64_t row_bytes, int64_t k, float scale,
                      int32_t *touched)
{
    for (int64_t p = 0; p < peers; p++) {
        const uint8_t *row = rows + p * row_bytes;
        for (int64_t j = 0; j < k; j++) {
            int32_t index;
            float value;
            memcpy(&index, row + 4 * j, sizeof index);
            memcpy(&value, row + 4 * (k + j), sizeof value);
            out[index] += value * scale;
            touched[p * k + j] = index;
        }
    }
}

/* x[indices[j]] -= x[indices[j]] for j < m: what was sent in float32 leaves zero behind (NaN where it was not finite). */
void clear_at(float *x, const int32_t *indices, int64_t m)
{
    for (int64_t j = 0; j < m; j++) x[indices[j]] -= x[indices[j]];
}

/* 1 if x is finite at every position in indices[0, m), else 0. */
int finite_at(const float *x, const int32_t *indices, int64_t m)
{
    int finite = 1;
    for (int64_t j = 0; j < m; j++) {
        int32_t bits;
        memcpy(&bits, x + indices[j], sizeof bits);
        finite &= (bits & EXPONENT) != EXPONENT;
    }
    return finite;
}
