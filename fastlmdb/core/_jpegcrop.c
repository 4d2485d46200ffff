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
 * Optional: fastlmdb falls back to full decoding when this module was not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <jpeglib.h>
#include <jerror.h> /* message codes: JWRN_JPEG_EOF */

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

static PyMethodDef methods[] = {
    {"decode_region", (PyCFunction)(void (*)(void))decode_region, METH_VARARGS | METH_KEYWORDS,
     "decode_region(data, top, left, height, width, denom, strict=False)\n"
     "    -> (rgb, rows, cols, col_offset)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegcrop",
                                    "Region decoding with libjpeg-turbo.", -1, methods};

PyMODINIT_FUNC PyInit__jpegcrop(void) { return PyModule_Create(&module); }
