/* Fused CPU loops for the hook's hot path (see kernels.py, which compiles and loads this file).

   On a CPU the hook is bound by memory passes and by the fixed cost of each
   tensor call. These loops do in one pass what the PyTorch path does in
   several, with the same float32 arithmetic, so both paths give bit-identical
   results:

   - accumulate: acc = grad + residual, grad zeroed (it becomes the sparse
     update), and the selection's sample of acc read on the way;
   - topk_sampled: the whole of compression.py's sampled top-k (thresholds
     from the sample, the filter of the positions above one, the k-th
     largest magnitude among those);
   - scatter_add, clear_at, finite_at: the decoding of what arrived, and the
     finite check, at the sent positions only.

   Magnitudes compare as integers: with the sign bit cleared, a float32's bits
   order exactly as its magnitude does (inf above every finite value, NaN
   above inf), as compression.py's PyTorch path compares them. Built with
   -ffp-contract=off, so no multiply-add is fused and rounding matches
   PyTorch's. Vectors use GCC's vector extensions (GCC and Clang), not one
   instruction set, so the file builds on x86-64 and ARM alike. */

#include <stdint.h>
#include <string.h>

#define MAGNITUDE 0x7fffffff
#define EXPONENT 0x7f800000
/* Entries added per inner pass: the chunk is still in L1 when its sampled entries are read. */
#define CHUNK 2048
/* Entries tested together: a group with none above the threshold costs one vector compare. */
#define GROUP 16

typedef int32_t v4i __attribute__((vector_size(16)));
typedef int64_t v2l __attribute__((vector_size(16)));

/* Positions in a[0, m) above threshold, appended to found from *count (only while under capacity).
   Branch-free where found has room for all m: each position is written, and kept by advancing. */
static void filter_group(const float *a, int64_t offset, int64_t m, int32_t threshold, int32_t *found,
                         int64_t capacity, int64_t *count)
{
    int64_t c = *count;
    if (c + m <= capacity) {
        for (int64_t j = 0; j < m; j++) {
            int32_t bits;
            memcpy(&bits, a + j, sizeof bits);
            found[c] = (int32_t)(offset + j);
            c += (bits & MAGNITUDE) > threshold;
        }
    } else {
        for (int64_t j = 0; j < m; j++) {
            int32_t bits;
            memcpy(&bits, a + j, sizeof bits);
            if ((bits & MAGNITUDE) > threshold) {
                if (c < capacity) found[c] = (int32_t)(offset + j);
                c++;
            }
        }
    }
    *count = c;
}

/* acc = grad + residual and grad = 0 over n entries, chunk by chunk; sample[i] = acc[positions[i]]
   for the m positions, which must be ascending (read while their chunk is in cache). */
void accumulate(float *restrict grad, const float *restrict residual, float *restrict acc, int64_t n,
                const int64_t *positions, int64_t m, float *sample)
{
    int64_t next = 0;
    for (int64_t start = 0; start < n; start += CHUNK) {
        int64_t end = n - start < CHUNK ? n : start + CHUNK;
        for (int64_t j = start; j < end; j++) {
            acc[j] = grad[j] + residual[j];
            grad[j] = 0.0f;
        }
        for (; next < m && positions[next] < end; next++) sample[next] = acc[positions[next]];
    }
}

/* Positions of x[0, n) whose magnitude bits exceed threshold, in order, written to found up to
   capacity; returns how many there are (more than capacity: found holds the first capacity). */
static int64_t filter_above(const float *x, int64_t n, int32_t threshold, int32_t *found, int64_t capacity)
{
    const v4i magnitude = {MAGNITUDE, MAGNITUDE, MAGNITUDE, MAGNITUDE};
    const v4i limit = {threshold, threshold, threshold, threshold};
    int64_t count = 0, j = 0;
    for (; j + GROUP <= n; j += GROUP) {
        v4i b0, b1, b2, b3;
        memcpy(&b0, x + j, sizeof b0);
        memcpy(&b1, x + j + 4, sizeof b1);
        memcpy(&b2, x + j + 8, sizeof b2);
        memcpy(&b3, x + j + 12, sizeof b3);
        v2l above = (v2l)(((b0 & magnitude) > limit) | ((b1 & magnitude) > limit) | ((b2 & magnitude) > limit) |
                          ((b3 & magnitude) > limit));
        if (above[0] | above[1]) filter_group(x + j, j, GROUP, threshold, found, capacity, &count);
    }
    filter_group(x + j, j, n - j, threshold, found, capacity, &count);
    return count;
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

/* compression.py's sampled top-k, in one call: sample holds the m sampled magnitudes (reordered
   here), rank_first < rank_second the two thresholds' ranks in it, found room for capacity
   positions and scratch for as many magnitudes. On success writes the k chosen positions to
   indices and their values to values, and returns k: the positions above the k-th largest
   magnitude in order, then as many of those equal to it as fit, lowest first; or, when fewer than
   k are nonzero, every nonzero position then the first zeros. Returns -1 when both thresholds let
   fewer than k through, or more than capacity (the caller falls back). */
int64_t topk_sampled(const float *x, int64_t n, int32_t *sample, int64_t m, int64_t rank_first, int64_t rank_second,
                     int64_t k, int32_t *found, int32_t *scratch, int64_t capacity, int32_t *indices, float *values)
{
    int32_t threshold = nth_smallest(sample, m, m - rank_first);
    int64_t count = filter_above(x, n, threshold, found, capacity);
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

/* out[indices[j]] += values[j] * scale for j < m, in order (as index_add_ adds). */
void scatter_add(float *out, const int32_t *indices, const float *values, int64_t m, float scale)
{
    for (int64_t j = 0; j < m; j++) out[indices[j]] += values[j] * scale;
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
