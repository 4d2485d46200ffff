/* Antialiased separable bilinear resize, the filter of torch's interpolate(antialias=True)
 * and PIL: a triangle widened by the downscale factor, weights normalised per output pixel,
 * fixed-point (14 bits), rounded and clamped after each pass. Unlike them the vertical
 * pass runs first, one output row at a time: it vectorises over the whole input row, and the
 * horizontal pass then filters out_h rows instead of in_h (within ~1 of theirs per value:
 * tests/test_native_batch.py pins the PSNR). An axis whose size stays is not filtered. Where
 * the CPU has AVX2 both passes run as intrinsics kernels that give the same bytes (2.3x faster
 * on the decode-aware crops of the sample photos: 410 -> 175 us per 224x224 slot). With a
 * table (a recipe's tail), each finished row goes through it as it is stored: lookup(). */
#include "_resize.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The two passes also built for AVX2, picked at load time where the CPU has it (GCC's ifunc). */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define PRECISION 14 /* int16 weights: SSE2 multiplies 8 of them at once (pmullw/pmulhw) */
#define HALF (1 << (PRECISION - 1))

static int grow(void **buffer, size_t *size, size_t need) {
    if (need <= *size) return 0;
    void *bigger = realloc(*buffer, need);
    if (bigger == NULL) return -1;
    *buffer = bigger;
    *size = need;
    return 0;
}

static double triangle(double x) {
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

static void window(int in, int out, int i, int *lo, int *hi) {
    double scale = (double)in / out, support = scale >= 1.0 ? scale : 1.0;
    double center = scale * (i + 0.5);
    *lo = (int)(center - support + 0.5), *hi = (int)(center + support + 0.5);
    if (*lo < 0) *lo = 0;
    if (*hi > in) *hi = in;
}

/* Taps per output pixel of one axis: the widest window, so loops have one trip count. */
static int taps_for(int in, int out) {
    int taps = 1, lo, hi;
    for (int i = 0; i < out; i++) {
        window(in, out, i, &lo, &hi);
        if (hi - lo > taps) taps = hi - lo;
    }
    return taps;
}

/* `taps + 1` ints per output pixel: the first input index, then `taps` weights (zero past
 * the filter's support; the window is moved left where it would pass the input's end). */
static void fill_taps(int in, int out, int taps, int32_t *table) {
    double scale = (double)in / out;
    double inverse = scale >= 1.0 ? 1.0 / scale : 1.0;
    for (int i = 0; i < out; i++, table += taps + 1) {
        double center = scale * (i + 0.5);
        int lo, hi;
        window(in, out, i, &lo, &hi);
        int start = lo < in - taps ? lo : in - taps;
        double total = 0.0;
        for (int j = lo; j < hi; j++) total += triangle((j - center + 0.5) * inverse);
        table[0] = start;
        memset(table + 1, 0, sizeof(int32_t) * taps);
        for (int j = lo; j < hi; j++) {
            double weight = triangle((j - center + 0.5) * inverse) / total;
            table[1 + j - start] = (int32_t)lround(weight * (1 << PRECISION));
        }
    }
}

static uint8_t clamp(int32_t value) {
    value >>= PRECISION;
    return value < 0 ? 0 : value > 255 ? 255 : (uint8_t)value;
}

/* One output row of `width` values from input rows `stride` bytes apart. */
CLONES static void vertical(const uint8_t *in, size_t stride, size_t width, const int32_t *tap,
                     int taps, int32_t *acc, uint8_t *row) {
    for (size_t i = 0; i < width; i++) acc[i] = HALF;
    for (int j = 0; j < taps; j++) {
        int16_t weight = (int16_t)tap[1 + j];
        const uint8_t *src = in + (size_t)(tap[0] + j) * stride;
        if (weight == 0) continue;
        for (size_t i = 0; i < width; i++) acc[i] += (int32_t)(int16_t)src[i] * weight;
    }
    for (size_t i = 0; i < width; i++) row[i] = clamp(acc[i]);
}

/* One pixel's taps: the first of them at p, `taps` weights. Reads 4 bytes a pixel (its RGB
 * and one more): rows carry 4 bytes of padding. Returns r | g << 8 | b << 16. */
#if defined(__SSE2__)
#include <emmintrin.h>
#define PIXEL(p, weights, TAPS)                                                              \
    ({                                                                                       \
        __m128i acc = _mm_set1_epi32(HALF), zero = _mm_setzero_si128();                      \
        for (int j = 0; j < (TAPS); j++) {                                                   \
            int32_t word;                                                                    \
            memcpy(&word, (p) + 3 * j, 4);                                                   \
            __m128i px = _mm_unpacklo_epi8(_mm_cvtsi32_si128(word), zero);                   \
            /* words r,0,g,0,b,0,.. times w,0,w,0,..: one weight (< 2^15) per lane */        \
            acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_unpacklo_epi16(px, zero),            \
                                                    _mm_set1_epi32((weights)[j])));          \
        }                                                                                    \
        acc = _mm_srai_epi32(acc, PRECISION);                                                \
        acc = _mm_packs_epi32(acc, acc);                                                     \
        (uint32_t) _mm_cvtsi128_si32(_mm_packus_epi16(acc, acc));                            \
    })
#else
#define PIXEL(p, weights, TAPS)                                                              \
    ({                                                                                       \
        int32_t r = HALF, g = HALF, b = HALF;                                                \
        for (int j = 0; j < (TAPS); j++) {                                                   \
            r += (p)[3 * j] * (weights)[j], g += (p)[3 * j + 1] * (weights)[j];              \
            b += (p)[3 * j + 2] * (weights)[j];                                              \
        }                                                                                    \
        (uint32_t)(clamp(r) | clamp(g) << 8 | clamp(b) << 16);                               \
    })
#endif

/* One interleaved RGB row -> its row of each of the 3 planes, mirrored when asked. Written
 * once per tap count (TAPS: a constant the compiler unrolls) and once for any count. */
#define HORIZONTAL(name, TAPS)                                                                \
    static void name(const uint8_t *row, int out_w, const int32_t *table, int taps,          \
                     uint8_t *out, size_t plane, int mirror) {                               \
        (void)taps;                                                                          \
        for (int x = 0; x < out_w; x++, table += (TAPS) + 1) {                               \
            uint32_t rgb = PIXEL(row + (size_t)table[0] * 3, table + 1, TAPS);               \
            int ox = mirror ? out_w - 1 - x : x;                                             \
            out[ox] = (uint8_t)rgb, out[plane + ox] = (uint8_t)(rgb >> 8);                   \
            out[2 * plane + ox] = (uint8_t)(rgb >> 16);                                      \
        }                                                                                    \
    }
HORIZONTAL(horizontal_2, 2)
HORIZONTAL(horizontal_3, 3)
HORIZONTAL(horizontal_4, 4)
HORIZONTAL(horizontal_5, 5)
HORIZONTAL(horizontal_any, taps)

typedef void (*horizontal_fn)(const uint8_t *, int, const int32_t *, int, uint8_t *, size_t,
                              int);

static horizontal_fn horizontal_for(int taps) {
    switch (taps) {
    case 2: return horizontal_2;
    case 3: return horizontal_3;
    case 4: return horizontal_4;
    case 5: return horizontal_5;
    default: return horizontal_any;
    }
}

static void deinterleave(const uint8_t *row, int width, uint8_t *out, size_t plane,
                         int mirror) {
    for (int x = 0; x < width; x++, row += 3) {
        int ox = mirror ? width - 1 - x : x;
        out[ox] = row[0], out[plane + ox] = row[1], out[2 * plane + ox] = row[2];
    }
}

/* ------------------------------------------------------------ x86 kernels, picked at run time
 * The same fixed-point sums as the portable passes above (so the same bytes), with two taps
 * per multiply-add (pmaddwd) and the accumulators in registers. */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define SIMD_KERNELS 1

static int simd = -1; /* -1: not yet asked; resize_use_simd() may turn it off */

static int simd_on(void) {
    if (simd < 0) {
        __builtin_cpu_init();
        simd = __builtin_cpu_supports("avx2") != 0;
    }
    return simd;
}

/* Two weights as the word pair (a, b) that pmaddwd multiplies a pixel pair by. */
static int32_t tap_pair(int32_t a, int32_t b) {
    return (a & 0xffff) | (int32_t)((uint32_t)b << 16);
}

#define MAX_SIMD_TAPS 64

/* vertical(), 16 values at a time: rows j and j + 1 interleaved byte by byte, as words, times
 * (w_j, w_j+1) pairs (an odd last tap pairs with itself at weight 0). */
__attribute__((target("avx2"))) static void vertical_avx2(const uint8_t *in, size_t stride,
                                                           size_t width, const int32_t *tap,
                                                           int taps, uint8_t *row) {
    const uint8_t *rows[MAX_SIMD_TAPS + 1];
    __m256i pairs[MAX_SIMD_TAPS / 2];
    int count = (taps + 1) / 2;
    for (int j = 0; j < taps; j++) rows[j] = in + (size_t)(tap[0] + j) * stride;
    rows[taps] = rows[taps - 1];
    for (int k = 0; k < count; k++) {
        int32_t second = 2 * k + 1 < taps ? tap[2 + 2 * k] : 0;
        pairs[k] = _mm256_set1_epi32(tap_pair(tap[1 + 2 * k], second));
    }
    size_t i = 0;
    for (; i + 16 <= width; i += 16) {
        __m256i lo = _mm256_set1_epi32(HALF), hi = lo;
        for (int k = 0; k < count; k++) {
            __m128i a = _mm_loadu_si128((const __m128i *)(rows[2 * k] + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(rows[2 * k + 1] + i));
            __m256i low = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b));
            __m256i high = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b));
            lo = _mm256_add_epi32(lo, _mm256_madd_epi16(low, pairs[k]));
            hi = _mm256_add_epi32(hi, _mm256_madd_epi16(high, pairs[k]));
        }
        __m256i words = _mm256_packs_epi32(_mm256_srai_epi32(lo, PRECISION),
                                           _mm256_srai_epi32(hi, PRECISION));
        words = _mm256_permute4x64_epi64(words, 0xD8); /* packs works per 128-bit lane */
        _mm_storeu_si128((__m128i *)(row + i),
                         _mm_packus_epi16(_mm256_castsi256_si128(words),
                                          _mm256_extracti128_si256(words, 1)));
    }
    for (; i < width; i++) {
        int32_t acc = HALF;
        for (int j = 0; j < taps; j++) acc += rows[j][i] * (int16_t)tap[1 + j];
        row[i] = clamp(acc);
    }
}

/* Per output pixel of a row of up to 4 taps: its first tap's byte offset, then its weights
 * as two (w0, w1), (w2, w3) word pairs, from the taps table (already mirrored). */
static void pack_taps(const int32_t *table, int out_w, int taps, int32_t *packed) {
    for (int x = 0; x < out_w; x++, table += taps + 1, packed += 3) {
        const int32_t *w = table + 1;
        packed[0] = table[0] * 3;
        packed[1] = tap_pair(w[0], taps > 1 ? w[1] : 0);
        packed[2] = taps > 2 ? tap_pair(w[2], taps > 3 ? w[3] : 0) : 0;
    }
}

/* One pixel from 16 bytes at its first tap (rows carry 16 bytes of padding): words
 * (r0 r1 g0 g1 b0 b1 0 0) and (r2 r3 g2 g3 b2 b3 0 0) times its pairs; r, g, b, 0 as int32. */
__attribute__((target("avx2"))) static inline __m128i pixel4(const uint8_t *row,
                                                              const int32_t *packed, int wide) {
    const __m128i first = _mm_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1);
    const __m128i second = _mm_setr_epi8(6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1,
                                         -1);
    __m128i px = _mm_loadu_si128((const __m128i *)(row + packed[0]));
    __m128i acc = _mm_add_epi32(_mm_set1_epi32(HALF),
                                _mm_madd_epi16(_mm_shuffle_epi8(px, first),
                                               _mm_set1_epi32(packed[1])));
    if (wide)
        acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_shuffle_epi8(px, second),
                                                _mm_set1_epi32(packed[2])));
    return _mm_srai_epi32(acc, PRECISION);
}

/* horizontal() for up to 4 taps (`wide`: more than 2): 4 pixels at a time, regrouped into
 * their planes (r0 r1 r2 r3, g0 .., b0 ..) and stored as one 4-byte word per plane. */
__attribute__((target("avx2"))) static void horizontal4_avx2(const uint8_t *row, int out_w,
                                                              const int32_t *packed, int wide,
                                                              uint8_t *out, size_t plane) {
    const __m128i planar = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    int x = 0;
    for (; x + 4 <= out_w; x += 4, packed += 12) {
        __m128i p0 = pixel4(row, packed, wide), p1 = pixel4(row, packed + 3, wide);
        __m128i p2 = pixel4(row, packed + 6, wide), p3 = pixel4(row, packed + 9, wide);
        __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(p0, p1), _mm_packs_epi32(p2, p3));
        bytes = _mm_shuffle_epi8(bytes, planar);
        uint32_t r = (uint32_t)_mm_cvtsi128_si32(bytes);
        uint32_t g = (uint32_t)_mm_extract_epi32(bytes, 1);
        uint32_t b = (uint32_t)_mm_extract_epi32(bytes, 2);
        memcpy(out + x, &r, 4), memcpy(out + plane + x, &g, 4), memcpy(out + 2 * plane + x, &b, 4);
    }
    for (; x < out_w; x++, packed += 3) {
        __m128i p = pixel4(row, packed, wide);
        uint32_t rgb = (uint32_t)_mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(p, p), p));
        out[x] = (uint8_t)rgb, out[plane + x] = (uint8_t)(rgb >> 8);
        out[2 * plane + x] = (uint8_t)(rgb >> 16);
    }
}

/* The table of a mirrored row: output pixel x takes the taps of out_w - 1 - x. */
static void mirror_taps(int32_t *table, int out_w, int taps) {
    int32_t swap[64];
    size_t entry = (size_t)(taps + 1);
    for (int x = 0, y = out_w - 1; x < y; x++, y--) {
        memcpy(swap, table + x * entry, entry * sizeof(int32_t));
        memcpy(table + x * entry, table + y * entry, entry * sizeof(int32_t));
        memcpy(table + y * entry, swap, entry * sizeof(int32_t));
    }
}
#endif

int resize_use_simd(int enabled) {
#ifdef SIMD_KERNELS
    int was = simd_on();
    simd = enabled ? -1 : 0;
    return was;
#else
    (void)enabled;
    return 0;
#endif
}

/* The planar uint8 row of each channel (`width` values, planes `width` apart) through the
 * table into row `out` of each output plane (planes `plane` items apart): the slot's only
 * store. Bound by the loads (a byte, then its item): on x86 4 or 8 items are gathered into
 * one register and stored together (50 us per 224 x 224 float32 image here, against 70 item
 * by item; AVX2's vpgatherdd took 80). memcpy: `out` need not be aligned for its items. */
static void lookup(const uint8_t *row, int width, const union resize_table *table,
                   int itemsize, uint8_t *out, size_t plane) {
    for (int c = 0; c < 3; c++, row += width) {
        uint8_t *dst = out + c * plane * itemsize;
        int x = 0;
        if (itemsize == 4) {
            const uint32_t *t = table->u32 + 256 * c;
#if defined(__SSE2__)
            for (; x + 4 <= width; x += 4)
                _mm_storeu_si128((__m128i *)(dst + 4 * x),
                                 _mm_setr_epi32((int)t[row[x]], (int)t[row[x + 1]],
                                                (int)t[row[x + 2]], (int)t[row[x + 3]]));
#endif
            for (; x < width; x++) memcpy(dst + 4 * x, t + row[x], 4);
        } else if (itemsize == 2) {
            const uint16_t *t = table->u16 + 256 * c;
#if defined(__SSE2__)
            for (; x + 8 <= width; x += 8)
                _mm_storeu_si128((__m128i *)(dst + 2 * x),
                                 _mm_setr_epi16((short)t[row[x]], (short)t[row[x + 1]],
                                                (short)t[row[x + 2]], (short)t[row[x + 3]],
                                                (short)t[row[x + 4]], (short)t[row[x + 5]],
                                                (short)t[row[x + 6]], (short)t[row[x + 7]]));
#endif
            for (; x < width; x++) memcpy(dst + 2 * x, t + row[x], 2);
        } else {
            const uint8_t *t = table->u8 + 256 * c;
            for (; x < width; x++) dst[x] = t[row[x]];
        }
    }
}

int resize_rgb_to_chw(const uint8_t *in, int in_h, int in_w, size_t stride, void *out,
                      int out_h, int out_w, int flips, const union resize_table *table,
                      int itemsize, struct resize_scratch *s) {
    int th = taps_for(in_w, out_w), tv = taps_for(in_h, out_h);
    size_t width = (size_t)in_w * 3, plane = (size_t)out_h * out_w;
    size_t taps = (size_t)out_w * (th + 1) + (size_t)out_h * (tv + 1);
    if (grow((void **)&s->acc, &s->acc_size, width * sizeof(int32_t)) ||
        grow((void **)&s->rows, &s->rows_size, width + 16) || /* + PIXEL's padding */
        grow((void **)&s->taps, &s->taps_size, taps * sizeof(int32_t)) ||
        (table && grow((void **)&s->planar, &s->planar_size, (size_t)out_w * 3 + 16)))
        return -1;
    int32_t *htaps = s->taps, *vtaps = s->taps + (size_t)out_w * (th + 1);
    if (in_w != out_w) fill_taps(in_w, out_w, th, htaps);
    if (in_h != out_h) fill_taps(in_h, out_h, tv, vtaps);
    horizontal_fn horizontal = horizontal_for(th);
    int mirror = flips & FLIP_HORIZONTAL, fast = 0, packed = 0;
#ifdef SIMD_KERNELS
    fast = simd_on();
    if (fast && in_w != out_w && th <= 4) {
        if (grow((void **)&s->packed, &s->packed_size, (size_t)out_w * 3 * sizeof(int32_t)))
            return -1;
        if (mirror) mirror_taps(htaps, out_w, th), mirror = 0;
        pack_taps(htaps, out_w, th, s->packed);
        packed = 1;
    }
#endif
    /* With a table, each output row goes planar into scratch (still in L1), then through it. */
    size_t row_plane = table ? (size_t)out_w : plane;
    for (int y = 0; y < out_h; y++) {
        const uint8_t *row = in + (size_t)y * stride;
        const int32_t *vtap = vtaps + (size_t)y * (tv + 1);
        if (in_h != out_h) {
#ifdef SIMD_KERNELS
            if (fast && tv <= MAX_SIMD_TAPS) vertical_avx2(in, stride, width, vtap, tv, s->rows);
            else
#endif
            vertical(in, stride, width, vtap, tv, s->acc, s->rows);
            row = s->rows;
        } else if (in_w != out_w) {
            memcpy(s->rows, row, width); /* padded */
            row = s->rows;
        }
        size_t oy = (size_t)(flips & FLIP_VERTICAL ? out_h - 1 - y : y) * out_w;
        uint8_t *dst = table ? s->planar : (uint8_t *)out + oy;
        if (in_w == out_w)
            deinterleave(row, out_w, dst, row_plane, flips & FLIP_HORIZONTAL);
#ifdef SIMD_KERNELS
        else if (packed)
            horizontal4_avx2(row, out_w, s->packed, th > 2, dst, row_plane);
#endif
        else
            horizontal(row, out_w, htaps, th, dst, row_plane, mirror);
        if (table) lookup(s->planar, out_w, table, itemsize, (uint8_t *)out + oy * itemsize,
                          plane);
    }
    return 0;
}

void resize_scratch_free(struct resize_scratch *s) {
    free(s->rows);
    free(s->acc);
    free(s->taps);
    free(s->packed);
    free(s->planar);
    memset(s, 0, sizeof(*s));
}
