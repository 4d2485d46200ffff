/* Antialiased bilinear resize of interleaved RGB into a planar (CHW) uint8 slot, with flips. */
#ifndef FASTLMDB_RESIZE_H
#define FASTLMDB_RESIZE_H

#include <stddef.h>
#include <stdint.h>

/* Scratch memory one thread reuses from image to image; zero it before first use. */
struct resize_scratch {
    uint8_t *rows;     /* one row after the vertical pass: in_w x 3 */
    size_t rows_size;
    int32_t *acc;      /* that row being accumulated */
    size_t acc_size;
    int32_t *taps;     /* per output pixel of each axis: first input index, weights */
    size_t taps_size;
    int32_t *packed;   /* the horizontal taps as the x86 kernel reads them */
    size_t packed_size;
};

#define FLIP_HORIZONTAL 1
#define FLIP_VERTICAL 2

/* Resize in_h x in_w RGB pixels (rows `stride` bytes apart) to out_h x out_w, written as
 * 3 planes of out_h x out_w into `out`, mirrored as `flips` says. Returns 0, or -1 when
 * scratch memory could not be allocated (nothing is written then). */
int resize_rgb_to_chw(const uint8_t *in, int in_h, int in_w, size_t stride, uint8_t *out,
                      int out_h, int out_w, int flips, struct resize_scratch *scratch);

void resize_scratch_free(struct resize_scratch *scratch);

/* Whether the x86 kernels (AVX2, where the CPU has it) run: enabled 0 forces the portable
 * ones, for tests; returns whether they ran before. The bytes are the same either way. */
int resize_use_simd(int enabled);

#endif
