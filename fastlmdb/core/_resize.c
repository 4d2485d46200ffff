/* Antialiased separable bilinear resize, as torch's interpolate(antialias=True) and PIL do:
 * a triangle filter widened by the downscale factor, weights normalised per output pixel,
 * horizontal pass first into uint8 rows, then the vertical pass; fixed-point weights
 * (PIL's 22 bits), rounded, clamped. An axis whose size does not change is not filtered. */
#include "_resize.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION 22

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

/* Taps of one axis, `kmax + 2` ints per output pixel: first input index, count, weights. */
static int kmax_for(int in, int out) {
    double scale = (double)in / out;
    return (int)ceil(scale >= 1.0 ? scale : 1.0) * 2 + 1;
}

static void fill_taps(int in, int out, int kmax, int32_t *taps) {
    double scale = (double)in / out;
    double support = scale >= 1.0 ? scale : 1.0;
    double inverse = scale >= 1.0 ? 1.0 / scale : 1.0;
    for (int i = 0; i < out; i++, taps += kmax + 2) {
        double center = scale * (i + 0.5);
        int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
        if (lo < 0) lo = 0;
        if (hi > in) hi = in;
        if (hi - lo > kmax) hi = lo + kmax;
        double total = 0.0;
        for (int j = 0; j < hi - lo; j++) total += triangle((j + lo - center + 0.5) * inverse);
        taps[0] = lo;
        taps[1] = hi - lo;
        for (int j = 0; j < hi - lo; j++) {
            double weight = triangle((j + lo - center + 0.5) * inverse) / total;
            taps[2 + j] = (int32_t)lround(weight * (1 << PRECISION));
        }
    }
}

static uint8_t clamp(int32_t value) {
    value >>= PRECISION;
    return value < 0 ? 0 : value > 255 ? 255 : (uint8_t)value;
}

static void horizontal(const uint8_t *in, int in_h, size_t stride, uint8_t *rows, int out_w,
                       int kmax, const int32_t *taps) {
    for (int y = 0; y < in_h; y++) {
        const uint8_t *src = in + (size_t)y * stride;
        uint8_t *dst = rows + (size_t)y * out_w * 3;
        const int32_t *tap = taps;
        for (int x = 0; x < out_w; x++, tap += kmax + 2, dst += 3) {
            const uint8_t *p = src + (size_t)tap[0] * 3;
            int32_t r = 1 << (PRECISION - 1), g = r, b = r;
            for (int j = 0; j < tap[1]; j++, p += 3) {
                r += p[0] * tap[2 + j];
                g += p[1] * tap[2 + j];
                b += p[2] * tap[2 + j];
            }
            dst[0] = clamp(r), dst[1] = clamp(g), dst[2] = clamp(b);
        }
    }
}

/* One output row (`width` interleaved values) from input rows `stride` bytes apart. */
static void vertical_row(const uint8_t *rows, size_t stride, size_t width, const int32_t *tap,
                         int32_t *acc) {
    for (size_t i = 0; i < width; i++) acc[i] = 1 << (PRECISION - 1);
    for (int j = 0; j < tap[1]; j++) {
        const uint8_t *src = rows + (size_t)(tap[0] + j) * stride;
        int32_t weight = tap[2 + j];
        for (size_t i = 0; i < width; i++) acc[i] += src[i] * weight;
    }
}

/* Interleaved row -> its row of each plane, mirrored when asked. */
static void planar_row(const int32_t *acc, int shift, uint8_t *out, int out_w, size_t plane,
                       int mirror) {
    for (int x = 0; x < out_w; x++) {
        int ox = mirror ? out_w - 1 - x : x;
        for (int c = 0; c < 3; c++) {
            int32_t v = acc[3 * x + c];
            out[c * plane + ox] = shift ? clamp(v) : (uint8_t)v;
        }
    }
}

int resize_rgb_to_chw(const uint8_t *in, int in_h, int in_w, size_t stride, uint8_t *out,
                      int out_h, int out_w, int flips, struct resize_scratch *s) {
    int kh = kmax_for(in_w, out_w), kv = kmax_for(in_h, out_h);
    size_t width = (size_t)out_w * 3, plane = (size_t)out_h * out_w;
    size_t taps = (size_t)out_w * (kh + 2) + (size_t)out_h * (kv + 2);
    if (grow((void **)&s->acc, &s->acc_size, width * sizeof(int32_t)) ||
        grow((void **)&s->taps, &s->taps_size, taps * sizeof(int32_t)))
        return -1;
    const uint8_t *rows = in;
    if (in_w != out_w) {
        if (grow((void **)&s->rows, &s->rows_size, (size_t)in_h * width)) return -1;
        fill_taps(in_w, out_w, kh, s->taps);
        horizontal(in, in_h, stride, s->rows, out_w, kh, s->taps);
        rows = s->rows;
        stride = width;
    }
    int32_t *vtaps = s->taps + (size_t)out_w * (kh + 2);
    if (in_h != out_h) fill_taps(in_h, out_h, kv, vtaps);
    for (int y = 0; y < out_h; y++) {
        int oy = flips & FLIP_VERTICAL ? out_h - 1 - y : y;
        if (in_h != out_h) {
            vertical_row(rows, stride, width, vtaps + (size_t)y * (kv + 2), s->acc);
        } else {
            const uint8_t *src = rows + (size_t)y * stride;
            for (size_t i = 0; i < width; i++) s->acc[i] = src[i];
        }
        planar_row(s->acc, in_h != out_h, out + (size_t)oy * out_w, out_w, plane,
                   flips & FLIP_HORIZONTAL);
    }
    return 0;
}

void resize_scratch_free(struct resize_scratch *s) {
    free(s->rows);
    free(s->acc);
    free(s->taps);
    memset(s, 0, sizeof(*s));
}
