/* Antialiased bilinear resize of interleaved RGB into a planar (CHW) slot, with flips: uint8
 * values, or each value looked up in a per-channel table (the recipe's tail: to float,
 * normalise) as it is stored. */
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
    uint8_t *planar;   /* one output row of each plane, before the table: 3 x out_w */
    size_t planar_size;
};

/* A table for resize_rgb_to_chw: item c * 256 + v is what value v of channel c becomes.
 * Aligned for any item size; only the first 768 items of the size in use are read. */
union resize_table {
    uint8_t u8[3 * 256];
    uint16_t u16[3 * 256];
    uint32_t u32[3 * 256];
};

#define FLIP_HORIZONTAL 1
#define FLIP_VERTICAL 2

/* Resize in_h x in_w RGB pixels (rows `stride` bytes apart) to out_h x out_w, written as
 * 3 planes of out_h x out_w items into `out`, mirrored as `flips` says. Without a table the
 * items are the uint8 values (itemsize 1); with one, value v of channel c is stored as
 * table item c * 256 + v, `itemsize` (1, 2 or 4) bytes. Returns 0, or -1 when scratch memory
 * could not be allocated (nothing is written then). */
int resize_rgb_to_chw(const uint8_t *in, int in_h, int in_w, size_t stride, void *out,
                      int out_h, int out_w, int flips, const union resize_table *table,
                      int itemsize, struct resize_scratch *scratch);

void resize_scratch_free(struct resize_scratch *scratch);

/* Whether the x86 kernels (AVX2, where the CPU has it) run: enabled 0 forces the portable
 * ones, for tests; returns whether they ran before. The bytes are the same either way. */
int resize_use_simd(int enabled);

#endif
