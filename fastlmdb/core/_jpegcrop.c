/* Decode only a region of a JPEG, at a reduced scale, with libjpeg-turbo's partial-decode API.
 *
 * decode_region(data, top, left, height, width, denom, strict=False)
 *     -> (pixels, rows, cols, col_offset)
 *
 * The box (top, left, height, width) is in full-resolution pixels; the JPEG is decoded at
 * scale 1/denom (denom in 1, 2, 4, 8). Only the rows of the box are colour-converted and
 * upsampled (rows above it are skipped after entropy decoding; rows below are never decoded,
 * and a box reaching the last row reads the file to its end marker, as PIL does),
 * and only the iMCU-aligned columns covering it go through the IDCT. `pixels` is RGB bytes of
 * rows x cols x 3, whose columns col_offset .. col_offset + ceil(width / denom) hold the box;
 * a box reaching past the image is clipped to it.
 * Errors raise ValueError. Lenient (the default) reads as PIL does: libjpeg's warnings about
 * corrupt data (extraneous bytes, bad Huffman codes) are ignored, and only running out of data
 * (a truncated file, which PIL refuses too) is an error. strict=True makes every warning one.
 *
 * decode_batch(values, boxes, flips, out, height, width, threads=1, table=None)
 *     -> [None or str, ...]
 *
 * A whole batch without the GIL: for record k, the box boxes[k] (int64 top, left, h, w) at
 * the coarsest scale covering height x width, resized (antialiased bilinear, _resize.c) into
 * slot k of `out` ([B, 3, height, width], C order), mirrored as flips[k] says (bit 0
 * horizontal, bit 1 vertical), by `threads` threads. Lenient as decode_region. Entry k of
 * the result is None, or why record k failed (its slot is then left as it was).
 * Without a table `out` holds uint8; with one (3 x 256 items of out's item size: 1, 2 or 4
 * bytes), value v of channel c is stored as item c * 256 + v, bytes copied: a float recipe's
 * tail (to float, normalise) in the store that writes the slot.
 *
 * resize_chw(pixels, out, table=None): that resize for one image, H x W x 3 in, 3 x h x w
 * out.
 * _use_simd(enabled) -> bool: switches the resize's AVX2 kernels (same bytes), for tests.
 * Optional: fastlmdb falls back to full decoding when this module was not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <jpeglib.h>
#include <jerror.h> /* message codes: JWRN_JPEG_EOF */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_resize.h"

struct error_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int strict;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct error_mgr *err = (struct error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    struct error_mgr *err = (struct error_mgr *)cinfo->err;
    if (level >= 0) return; /* trace messages */
    /* A warning. Without data left, jpeg_mem_src would pad with gray: PIL refuses that. */
    if (err->strict || cinfo->err->msg_code == JWRN_JPEG_EOF) on_error(cinfo);
    cinfo->err->num_warnings++; /* and never printed: libjpeg's default writes to stderr */
}

static JDIMENSION scaled(JDIMENSION x, int denom) { return (x + denom - 1) / denom; }

static PyObject *decode_region(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"data", "top", "left", "height", "width", "denom", "strict", NULL};
    Py_buffer data;
    unsigned int top, left, height, width;
    int denom, strict = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*IIIIi|p", keywords, &data, &top, &left,
                                     &height, &width, &denom, &strict))
        return NULL;
    if (denom != 1 && denom != 2 && denom != 4 && denom != 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "denom must be 1, 2, 4 or 8, got %d", denom);
    }
    struct jpeg_decompress_struct cinfo;
    struct error_mgr err;
    PyObject *volatile out = NULL;
    PyThreadState *volatile unlocked = NULL; /* set while the GIL is released */
    JDIMENSION rows = 0, cols = 0, offset = 0;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.strict = strict;
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        if (unlocked) PyEval_RestoreThread(unlocked);
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        Py_XDECREF(out);
        return PyErr_Format(PyExc_ValueError, "JPEG decode failed: %s", err.message);
    }
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (top >= cinfo.image_height || left >= cinfo.image_width || !height || !width) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "crop box outside the %ux%u image",
                            cinfo.image_width, cinfo.image_height);
    }
    if (height > cinfo.image_height - top) height = cinfo.image_height - top;
    if (width > cinfo.image_width - left) width = cinfo.image_width - left;
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    unlocked = PyEval_SaveThread();
    jpeg_start_decompress(&cinfo);
    PyEval_RestoreThread(unlocked);
    unlocked = NULL;
    JDIMENSION y0 = top / denom, x0 = left / denom;
    rows = scaled(height, denom);
    cols = scaled(width, denom);
    if (y0 + rows > cinfo.output_height) rows = cinfo.output_height - y0;
    if (x0 + cols > cinfo.output_width) cols = cinfo.output_width - x0;
    JDIMENSION xoff = x0, wide = cols;
    jpeg_crop_scanline(&cinfo, &xoff, &wide); /* widens to iMCU boundaries */
    offset = x0 - xoff;
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)rows * wide * 3);
    if (out == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *pixels = (unsigned char *)PyByteArray_AS_STRING(out);
    unlocked = PyEval_SaveThread();
    if (y0) jpeg_skip_scanlines(&cinfo, y0);
    while (cinfo.output_scanline < y0 + rows) {
        JSAMPROW row = pixels + (size_t)(cinfo.output_scanline - y0) * wide * 3;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    /* A box down to the last row reads the rest of the file, as PIL does: a damaged marker
     * after the image is an error there too. Rows below any other box are never decoded. */
    if (cinfo.output_scanline == cinfo.output_height) jpeg_finish_decompress(&cinfo);
    PyEval_RestoreThread(unlocked);
    unlocked = NULL;
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return Py_BuildValue("(NIII)", out, rows, wide, offset);
}

/* ---------------------------------------------------------------- whole batches */

#define MESSAGE_LENGTH (JMSG_LENGTH_MAX + 32)
#define MAX_THREADS 256

struct batch {
    Py_ssize_t count, next; /* next: the first slot no thread has taken (atomic) */
    Py_buffer *values;
    const int64_t *boxes;
    const uint8_t *flips;
    uint8_t *out;
    int height, width, itemsize;
    const union resize_table *table; /* NULL: uint8 out */
    char (*errors)[MESSAGE_LENGTH]; /* "" where that slot decoded */
};

struct scratch {
    uint8_t *region;
    size_t region_size;
    struct resize_scratch resize;
};

static int denom_for(int64_t h, int64_t w, int height, int width) {
    for (int denom = 8; denom > 1; denom /= 2)
        if ((h + denom - 1) / denom >= height && (w + denom - 1) / denom >= width) return denom;
    return 1;
}

/* Decode the box's rows and iMCU columns of one record into s->region; its geometry out. */
static int decode_box(const Py_buffer *value, const int64_t *box, int denom, struct scratch *s,
                      JDIMENSION *rows, JDIMENSION *cols, JDIMENSION *wide, JDIMENSION *offset,
                      char *message) {
    struct jpeg_decompress_struct cinfo;
    struct error_mgr err;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.strict = 0;
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        snprintf(message, MESSAGE_LENGTH, "JPEG decode failed: %s", err.message);
        return -1;
    }
    jpeg_mem_src(&cinfo, (const unsigned char *)value->buf, (unsigned long)value->len);
    jpeg_read_header(&cinfo, TRUE);
    int64_t top = box[0], left = box[1], height = box[2], width = box[3];
    if (top < 0 || left < 0 || height <= 0 || width <= 0 || top >= cinfo.image_height ||
        left >= cinfo.image_width) {
        snprintf(message, MESSAGE_LENGTH, "crop box outside the %ux%u image",
                 cinfo.image_width, cinfo.image_height);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (height > cinfo.image_height - top) height = cinfo.image_height - top;
    if (width > cinfo.image_width - left) width = cinfo.image_width - left;
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    jpeg_start_decompress(&cinfo);
    JDIMENSION y0 = top / denom, x0 = left / denom;
    *rows = scaled(height, denom);
    *cols = scaled(width, denom);
    if (y0 + *rows > cinfo.output_height) *rows = cinfo.output_height - y0;
    if (x0 + *cols > cinfo.output_width) *cols = cinfo.output_width - x0;
    JDIMENSION xoff = x0;
    *wide = *cols;
    jpeg_crop_scanline(&cinfo, &xoff, wide); /* widens to iMCU boundaries */
    *offset = x0 - xoff;
    size_t need = (size_t)*rows * *wide * 3;
    if (need > s->region_size) {
        uint8_t *bigger = realloc(s->region, need);
        if (bigger == NULL) {
            snprintf(message, MESSAGE_LENGTH, "out of memory for a %ux%u region", *wide, *rows);
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
        s->region = bigger, s->region_size = need;
    }
    if (y0) jpeg_skip_scanlines(&cinfo, y0);
    while (cinfo.output_scanline < y0 + *rows) {
        JSAMPROW row = s->region + (size_t)(cinfo.output_scanline - y0) * *wide * 3;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    if (cinfo.output_scanline == cinfo.output_height) jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

static void batch_slot(struct batch *b, Py_ssize_t k, struct scratch *s) {
    const int64_t *box = b->boxes + 4 * k;
    char *message = b->errors[k];
    JDIMENSION rows, cols, wide, offset;
    int denom = denom_for(box[2], box[3], b->height, b->width);
    if (decode_box(&b->values[k], box, denom, s, &rows, &cols, &wide, &offset, message)) return;
    uint8_t *slot = b->out + (size_t)k * 3 * b->height * b->width * b->itemsize;
    if (resize_rgb_to_chw(s->region + (size_t)offset * 3, (int)rows, (int)cols,
                          (size_t)wide * 3, slot, b->height, b->width, b->flips[k], b->table,
                          b->itemsize, &s->resize))
        snprintf(message, MESSAGE_LENGTH, "out of memory resizing a %ux%u region", cols, rows);
}

static void *batch_worker(void *arg) {
    struct batch *b = arg;
    struct scratch s = {0};
    for (;;) {
        Py_ssize_t k = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
        if (k >= b->count) break;
        batch_slot(b, k, &s);
    }
    free(s.region);
    resize_scratch_free(&s.resize);
    return NULL;
}

/* Runs the batch on `threads` threads, this one included; a thread that cannot be started
 * leaves its share to the others. */
static void run_batch(struct batch *b, int threads) {
    pthread_t helpers[threads > 1 ? threads - 1 : 1];
    int started = 0;
    for (int t = 1; t < threads && t < b->count; t++)
        if (pthread_create(&helpers[started], NULL, batch_worker, b) == 0) started++;
    batch_worker(b);
    for (int t = 0; t < started; t++) pthread_join(helpers[t], NULL);
}

static int check_buffer(Py_buffer *view, Py_ssize_t need, const char *name) {
    if (view->len == need) return 0;
    PyErr_Format(PyExc_ValueError, "%s has %zd bytes, %zd expected", name, view->len, need);
    return -1;
}

/* PyObject_GetBuffer, the error (of the same type) naming the argument. */
static int get_buffer(PyObject *object, Py_buffer *view, int flags, const char *name) {
    if (PyObject_GetBuffer(object, view, flags) == 0) return 0;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    PyErr_Format(type, "%s must be a C-contiguous%s buffer: %S", name,
                 flags & PyBUF_WRITABLE ? " writable" : "", value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return -1;
}

/* `out`'s item size, checked against `table` (None or 3 x 256 items of that size), which is
 * copied into `into`; -1 with an exception set. */
static int out_items(Py_buffer *out, PyObject *table, union resize_table *into) {
    Py_ssize_t itemsize = out->itemsize;
    if (table == NULL || table == Py_None) {
        if (itemsize == 1) return 1;
        PyErr_Format(PyExc_TypeError, "out has %zd-byte items: uint8 out, or pass a table of "
                     "its dtype (table=)", itemsize);
        return -1;
    }
    if (itemsize != 1 && itemsize != 2 && itemsize != 4) {
        PyErr_Format(PyExc_TypeError, "out has %zd-byte items: 1 (uint8), 2 (float16, "
                     "bfloat16) or 4 (float32) expected", itemsize);
        return -1;
    }
    Py_buffer view;
    if (get_buffer(table, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT, "table")) return -1;
    int ok = view.itemsize == itemsize && view.len == 3 * 256 * itemsize;
    if (view.itemsize != itemsize)
        PyErr_Format(PyExc_TypeError, "table has %zd-byte items, out %zd: give the table "
                     "out's dtype", view.itemsize, itemsize);
    else if (!ok)
        PyErr_Format(PyExc_ValueError, "table has %zd items, 768 (3 x 256) expected",
                     view.len / itemsize);
    else
        memcpy(into, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return ok ? (int)itemsize : -1;
}

static PyObject *batch_results(struct batch *b) {
    PyObject *results = PyList_New(b->count);
    for (Py_ssize_t k = 0; results && k < b->count; k++) {
        PyObject *item = b->errors[k][0] ? PyUnicode_DecodeLatin1(b->errors[k],
                                                                  strlen(b->errors[k]), NULL)
                                         : (Py_INCREF(Py_None), Py_None);
        if (item == NULL) Py_CLEAR(results);
        else PyList_SET_ITEM(results, k, item);
    }
    return results;
}

static PyObject *decode_batch(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"values", "boxes", "flips", "out", "height", "width", "threads",
                               "table", NULL};
    PyObject *values, *target, *table = NULL;
    Py_buffer boxes, flips, out;
    int height, width, threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oy*y*Oii|iO", keywords, &values, &boxes,
                                     &flips, &target, &height, &width, &threads, &table))
        return NULL;
    if (get_buffer(target, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT, "out")) {
        PyBuffer_Release(&boxes);
        PyBuffer_Release(&flips);
        return NULL;
    }
    PyObject *result = NULL, *seq = PySequence_Fast(values, "values must be a sequence");
    struct batch b = {0};
    union resize_table *lookup = PyMem_Malloc(sizeof(union resize_table));
    Py_ssize_t got = 0; /* values whose buffers are held */
    if (seq == NULL) goto done;
    if (lookup == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if ((b.itemsize = out_items(&out, table, lookup)) < 0) goto done;
    b.table = table == NULL || table == Py_None ? NULL : lookup;
    b.count = PySequence_Fast_GET_SIZE(seq);
    if (height <= 0 || width <= 0 || threads < 1 || threads > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "height and width must be >= 1 and threads 1 to %d, "
                     "got %d, %d, %d", MAX_THREADS, height, width, threads);
        goto done;
    }
    if (check_buffer(&boxes, b.count * 4 * (Py_ssize_t)sizeof(int64_t), "boxes") ||
        check_buffer(&flips, b.count, "flips") ||
        check_buffer(&out, b.count * 3 * (Py_ssize_t)height * width * b.itemsize, "out"))
        goto done;
    if (out.ndim > 1 && (out.ndim != 4 || out.shape[0] != b.count || out.shape[1] != 3 ||
                         out.shape[2] != height || out.shape[3] != width)) {
        PyErr_Format(PyExc_ValueError, "out must be [%zd, 3, %d, %d] (C order), got %d "
                     "dimensions of another shape", b.count, height, width, out.ndim);
        goto done;
    }
    b.values = PyMem_Calloc(b.count ? b.count : 1, sizeof(Py_buffer));
    b.errors = PyMem_Calloc(b.count ? b.count : 1, MESSAGE_LENGTH);
    if (b.values == NULL || b.errors == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < b.count; got++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, got), &b.values[got],
                               PyBUF_SIMPLE))
            goto done;
    b.boxes = boxes.buf, b.flips = flips.buf, b.out = out.buf;
    b.height = height, b.width = width;
    Py_BEGIN_ALLOW_THREADS
    run_batch(&b, threads);
    Py_END_ALLOW_THREADS
    result = batch_results(&b);
done:
    for (Py_ssize_t k = 0; k < got; k++) PyBuffer_Release(&b.values[k]);
    PyMem_Free(b.values);
    PyMem_Free(b.errors);
    PyMem_Free(lookup);
    Py_XDECREF(seq);
    PyBuffer_Release(&boxes);
    PyBuffer_Release(&flips);
    PyBuffer_Release(&out);
    return result;
}

/* resize_chw(pixels, out, table=None): pixels a uint8 H x W x 3 buffer whose pixels are 3
 * bytes apart (rows any distance: a column slice of a region), out a writable C-contiguous
 * 3 x h x w buffer: uint8, or items of the table's size through it (as decode_batch). */
static PyObject *resize_chw(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"", "", "table", NULL};
    PyObject *source, *target, *table = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O", keywords, &source, &target, &table))
        return NULL;
    Py_buffer in, out;
    if (PyObject_GetBuffer(source, &in, PyBUF_STRIDES | PyBUF_FORMAT)) return NULL;
    if (get_buffer(target, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT, "out")) {
        PyBuffer_Release(&in);
        return NULL;
    }
    PyObject *result = NULL;
    union resize_table *lookup = PyMem_Malloc(sizeof(union resize_table));
    int itemsize;
    if (lookup == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if ((itemsize = out_items(&out, table, lookup)) < 0) goto done;
    int bytes = (!in.format || !strcmp(in.format, "B")) &&
                (itemsize != 1 || !out.format || !strcmp(out.format, "B") || table);
    if (!bytes || in.ndim != 3 || in.shape[2] != 3 || in.strides[2] != 1 || in.strides[1] != 3 ||
        in.strides[0] < 3 * in.shape[1] || !in.shape[0] || !in.shape[1] || out.ndim != 3 ||
        out.shape[0] != 3 || !out.shape[1] || !out.shape[2]) {
        PyErr_SetString(PyExc_ValueError, "resize_chw needs uint8 H x W x 3 pixels (3 bytes "
                        "apart) and a C-contiguous 3 x h x w out (uint8, or the table's dtype)");
        goto done;
    }
    const union resize_table *used = table == NULL || table == Py_None ? NULL : lookup;
    struct resize_scratch scratch = {0};
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = resize_rgb_to_chw(in.buf, (int)in.shape[0], (int)in.shape[1], (size_t)in.strides[0],
                               out.buf, (int)out.shape[1], (int)out.shape[2], 0, used, itemsize,
                               &scratch);
    resize_scratch_free(&scratch);
    Py_END_ALLOW_THREADS
    if (failed) PyErr_NoMemory();
    else result = (Py_INCREF(Py_None), Py_None);
done:
    PyMem_Free(lookup);
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *use_simd(PyObject *self, PyObject *arg) {
    int enabled = PyObject_IsTrue(arg);
    if (enabled < 0) return NULL;
    return PyBool_FromLong(resize_use_simd(enabled));
}

static PyMethodDef methods[] = {
    {"decode_region", (PyCFunction)(void (*)(void))decode_region, METH_VARARGS | METH_KEYWORDS,
     "decode_region(data, top, left, height, width, denom, strict=False)\n"
     "    -> (rgb, rows, cols, col_offset)"},
    {"decode_batch", (PyCFunction)(void (*)(void))decode_batch, METH_VARARGS | METH_KEYWORDS,
     "decode_batch(values, boxes, flips, out, height, width, threads=1, table=None)\n"
     "    -> [None or str]"},
    {"resize_chw", (PyCFunction)(void (*)(void))resize_chw, METH_VARARGS | METH_KEYWORDS,
     "resize_chw(pixels, out, /, table=None): antialiased bilinear resize of H x W x 3 uint8 "
     "pixels into out, 3 x h x w (uint8, or through the table)"},
    {"_use_simd", use_simd, METH_O,
     "_use_simd(enabled) -> bool: whether the resize's x86 kernels ran before; False forces "
     "the portable ones (for tests: the bytes are the same)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegcrop",
                                    "Region decoding with libjpeg-turbo.", -1, methods};

PyMODINIT_FUNC PyInit__jpegcrop(void) { return PyModule_Create(&module); }
