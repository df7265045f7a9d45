/* Decode one region of a JPEG, at 1/1, 1/2, 1/4 or 1/8 scale, with libjpeg-turbo's partial decoding.
 *
 * A random-resized crop needs on average about half of an image. Rows above the crop are skipped
 * (jpeg_skip_scanlines: entropy-decoded only, no IDCT, upsampling or colour conversion), rows below it
 * are never read, and columns outside it are not transformed (jpeg_crop_scanline). No pip-installable
 * decoder exposes these two calls (docs/decode.md), so this small extension does; where it cannot be
 * built, data_pipeline.image.transforms decodes the whole image with simplejpeg instead.
 *
 * Python: decode_region(data, out, scale_denom, left, top, max_pixels=0) fills the writable C-contiguous
 * uint8 buffer ``out`` of shape [height, width, 3] with the RGB pixels of the region whose top-left corner
 * is (left, top) in the image scaled by 1/scale_denom (libjpeg's scaled size: ceil(side / scale_denom)).
 * Errors and corrupt-data warnings (a truncated file in the rows read, CMYK, a region outside the image,
 * a header of more than max_pixels pixels when max_pixels > 0) raise ValueError; nothing is ever printed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void error_exit(j_common_ptr cinfo) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

/* Corrupt-data warnings (level -1: a truncated file, bad Huffman codes) end the decode as errors do, as
 * simplejpeg's strict mode does: libjpeg would fill the rest with grey. Trace messages are dropped. */
static void warning_is_error(j_common_ptr cinfo, int level) {
    if (level < 0)
        error_exit(cinfo);
}

/* Pixels of the region, written row by row into out (stride width * 3). Returns NULL on success, or
 * the error message. The GIL is released by the caller. */
static const char *decode(const unsigned char *data, size_t size, unsigned char *out, int scale_denom,
                          uint64_t left, uint64_t top, uint64_t width, uint64_t height, uint64_t max_pixels,
                          ErrorManager *err) {
    struct jpeg_decompress_struct cinfo;
    JSAMPROW row = NULL;
    /* volatile: read after longjmp */
    unsigned char *volatile row_buffer = NULL;

    cinfo.err = jpeg_std_error(&err->pub);
    err->pub.error_exit = error_exit;
    err->pub.emit_message = warning_is_error;
    if (setjmp(err->escape)) { /* every failure ends here, with err->message set */
        jpeg_destroy_decompress(&cinfo);
        free(row_buffer);
        return err->message;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    /* Before jpeg_start_decompress, which allocates by the header's size (a progressive image's whole
     * coefficient buffer: 2 bytes per pixel and component, up to 2.4 GB for a 430-byte 20000x20000 header). */
    if (max_pixels > 0 && (uint64_t)cinfo.image_width * cinfo.image_height > max_pixels) {
        snprintf(err->message, sizeof err->message, "the header says %ux%u pixels, above the limit of %llu",
                 (unsigned)cinfo.image_width, (unsigned)cinfo.image_height, (unsigned long long)max_pixels);
        longjmp(err->escape, 1);
    }
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        strcpy(err->message, "CMYK JPEG");
        longjmp(err->escape, 1);
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale_denom;
    jpeg_start_decompress(&cinfo);
    /* 64-bit operands, each below 2^32: the sums cannot wrap, so a far-out box cannot pass as a near one. */
    if (width == 0 || height == 0 || left + width > cinfo.output_width || top + height > cinfo.output_height) {
        snprintf(err->message, sizeof err->message, "region %llux%llu at (%llu, %llu) is outside the %ux%u image",
                 (unsigned long long)width, (unsigned long long)height, (unsigned long long)left,
                 (unsigned long long)top, (unsigned)cinfo.output_width, (unsigned)cinfo.output_height);
        longjmp(err->escape, 1);
    }
    /* Whole iMCU columns are decoded; the upsampler treats the decoded strip's edges as image edges, so
     * one extra iMCU on each side keeps the region's own pixels equal to a full decode's. */
    const JDIMENSION rleft = (JDIMENSION)left, rtop = (JDIMENSION)top, rwidth = (JDIMENSION)width,
                     rheight = (JDIMENSION)height; /* within the image: the check above */
    JDIMENSION imcu = (JDIMENSION)(cinfo.max_h_samp_factor * cinfo.min_DCT_scaled_size);
    JDIMENSION x0 = rleft > imcu ? rleft - imcu : 0;
    JDIMENSION x1 = cinfo.output_width - (rleft + rwidth) > imcu ? rleft + rwidth + imcu : cinfo.output_width;
    JDIMENSION strip_left = x0, strip_width = x1 - x0;
    if (strip_width < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &strip_left, &strip_width); /* widened to iMCU boundaries */
    row_buffer = malloc((size_t)strip_width * 3);
    if (row_buffer == NULL) {
        strcpy(err->message, "out of memory");
        longjmp(err->escape, 1);
    }
    row = row_buffer;
    if (rtop > 0 && jpeg_skip_scanlines(&cinfo, rtop) != rtop) {
        strcpy(err->message, "truncated JPEG");
        longjmp(err->escape, 1);
    }
    const size_t offset = (size_t)(rleft - strip_left) * 3, bytes = (size_t)rwidth * 3;
    for (JDIMENSION y = 0; y < rheight; y++) {
        if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) {
            strcpy(err->message, "truncated JPEG");
            longjmp(err->escape, 1);
        }
        memcpy(out + (size_t)y * bytes, row_buffer + offset, bytes);
    }
    jpeg_destroy_decompress(&cinfo); /* the rows below the region are never decoded */
    free(row_buffer);
    return NULL;
}

/* "O&" converter: a Python int in [0, 2^32) to uint64_t; anything else (negative, huge, not an int) is a
 * ValueError, as a region outside the image is. */
static int to_coordinate(PyObject *obj, void *result) {
    int overflow = 0;
    long long value = PyLong_Check(obj) ? PyLong_AsLongLongAndOverflow(obj, &overflow) : -1;
    if (PyErr_Occurred())
        return 0;
    if (overflow || value < 0 || value > (long long)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "left, top and max_pixels must be ints in [0, 2**32)");
        return 0;
    }
    *(uint64_t *)result = (uint64_t)value;
    return 1;
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    PyObject *target;
    int scale_denom;
    uint64_t left, top, max_pixels = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*OiO&O&|O&", &data, &target, &scale_denom, to_coordinate, &left, to_coordinate,
                          &top, to_coordinate, &max_pixels))
        return NULL;
    if (PyObject_GetBuffer(target, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *result = NULL;
    if (scale_denom != 1 && scale_denom != 2 && scale_denom != 4 && scale_denom != 8) {
        PyErr_Format(PyExc_ValueError, "scale_denom must be 1, 2, 4 or 8, got %d", scale_denom);
    } else if (out.ndim != 3 || out.shape[2] != 3 || out.itemsize != 1) {
        PyErr_SetString(PyExc_ValueError, "out must be a C-contiguous uint8 buffer of shape [height, width, 3]");
    } else if (out.shape[0] > (Py_ssize_t)UINT32_MAX || out.shape[1] > (Py_ssize_t)UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "a region of %zdx%zd is larger than any JPEG", out.shape[1], out.shape[0]);
    } else {
        ErrorManager err;
        const char *failed;
        Py_BEGIN_ALLOW_THREADS
        failed = decode(data.buf, (size_t)data.len, out.buf, scale_denom, left, top, (uint64_t)out.shape[1],
                        (uint64_t)out.shape[0], max_pixels, &err);
        Py_END_ALLOW_THREADS
        if (failed)
            PyErr_SetString(PyExc_ValueError, failed);
        else
            result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, out, scale_denom, left, top, max_pixels=0): RGB pixels of a JPEG region into "
     "out [h, w, 3]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
