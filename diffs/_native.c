/*
 * Compiled kernels for the hot loops of applying a diff: Rice position decoding and the
 * sparse scatters. Optional: diffs/native.py falls back to the numpy code, which stays the
 * reference; tests hold the two bit-identical, hostile input included.
 *
 * Buffers come in through the buffer protocol (bytes, memoryview, contiguous numpy
 * arrays), so the module needs no numpy headers. Every loop runs without the GIL and
 * checks every index it writes through: bad input is an exception, never a bad write.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The format is little-endian and so are the loads below: on a big-endian machine the
 * build fails, the install goes on without this module and the numpy code runs. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "diffs._native supports little-endian machines only"
#endif

/* Unaligned little-endian 64-bit load of up to 8 bytes at p, of a stream ending at end. */
static inline uint64_t load_le64(const uint8_t *p, const uint8_t *end) {
    uint64_t v = 0;
    if (end - p >= 8) {
        memcpy(&v, p, 8);
    } else if (p < end) {
        memcpy(&v, p, (size_t)(end - p));
    }
    return v;
}

static uint64_t count_ones(const uint8_t *p, Py_ssize_t n) {
    uint64_t total = 0;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        total += (uint64_t)__builtin_popcountll(w);
    }
    for (; i < n; i++) total += (uint64_t)__builtin_popcount(p[i]);
    return total;
}

enum { RICE_OK = 0, RICE_COUNT, RICE_GAP, RICE_POSITION };

/* A Rice decoder part-way through its streams (see diffs/positions.py for the layout). */
typedef struct {
    const uint8_t *unary, *unary_end, *params, *rem, *rem_end;
    int block_log2;
    uint64_t limit;   /* n - 1: the largest position */
    uint64_t bit;     /* next unread bit of the unary stream */
    uint64_t rem_bit; /* next unread bit of the remainder stream */
    uint64_t pos;     /* the previous position; -1 before the first */
    Py_ssize_t word_index;
    uint64_t word; /* the unary stream's unread bits of the 8 bytes at word_index */
    int64_t i;     /* gaps decoded so far */
    int past_end;  /* a position was >= n: reported only if no quotient is bad */
} Rice;

static void rice_start(Rice *s, const uint8_t *unary, Py_ssize_t unary_len,
                       const uint8_t *params, int block_log2, const uint8_t *rem,
                       Py_ssize_t rem_len, int64_t n) {
    s->unary = unary;
    s->unary_end = unary + unary_len;
    s->params = params;
    s->block_log2 = block_log2;
    s->rem = rem;
    s->rem_end = rem + rem_len;
    s->limit = (uint64_t)(n - 1); /* n >= 1 whenever k >= 1 */
    s->bit = s->rem_bit = 0;
    s->pos = (uint64_t)-1;
    s->word_index = 0;
    s->word = load_le64(unary, s->unary_end);
    s->i = 0;
    s->past_end = 0;
}

/* The next count positions into out. The unary stream must hold at least that many more
 * one bits (the caller counted them). Returns RICE_GAP on a quotient too large for the
 * tensor, else RICE_OK (a position past the end only sets past_end).
 *
 * The gaps of a block share one Rice parameter, so the loop runs a block at a time with
 * the parameter's mask and quotient limit hoisted; a remainder is read with one unaligned
 * 8-byte load, bounds-checked only near the end of its stream. */
static int rice_next(Rice *s, int64_t count, int64_t *out, const uint8_t *prefetch,
                     int width) {
    uint64_t bit = s->bit, rem_bit = s->rem_bit, pos = s->pos, word = s->word;
    const uint64_t limit = s->limit;
    const uint8_t *rem = s->rem;
    /* a remainder starting at byte `at` <= last_full can be loaded 8 bytes at a time
     * unchecked (none can where the stream is shorter than 8 bytes) */
    const int64_t last_full = (int64_t)(s->rem_end - rem) - 8;
    Py_ssize_t word_index = s->word_index;
    const int64_t i0 = s->i, end = i0 + count;
    int64_t i = i0;
    int past_end = 0, status = RICE_OK;
    while (i < end) {
        int64_t block = i >> s->block_log2;
        int64_t stop = (block + 1) << s->block_log2;
        if (stop > end) stop = end;
        unsigned r = s->params[block];
        uint64_t qmax = limit >> r, low_mask = (UINT64_C(1) << r) - 1;
        for (; i < stop; i++) {
            while (word == 0) {
                word_index += 8;
                word = load_le64(s->unary + word_index, s->unary_end);
            }
            uint64_t one = (uint64_t)word_index * 8 + (uint64_t)__builtin_ctzll(word);
            word &= word - 1;
            uint64_t q = one - bit;
            bit = one + 1;
            if (q > qmax) {
                status = RICE_GAP;
                goto done;
            }
            uint64_t at = rem_bit >> 3, w;
            if ((int64_t)at <= last_full) {
                memcpy(&w, rem + at, 8);
            } else {
                w = load_le64(rem + at, s->rem_end);
            }
            pos += ((q << r) | ((w >> (rem_bit & 7)) & low_mask)) + 1;
            rem_bit += r;
            past_end |= pos > limit;
            out[i - i0] = (int64_t)pos;
            /* The caller's next loop writes there: start the cache miss now, while decoding. */
            if (prefetch != NULL && pos <= limit) __builtin_prefetch(prefetch + pos * width, 1);
        }
    }
done:
    s->bit = bit;
    s->rem_bit = rem_bit;
    s->pos = pos;
    s->word = word;
    s->word_index = word_index;
    s->i = i;
    s->past_end |= past_end;
    return status;
}

/* The three streams of a RICE position section (layout in diffs/positions.py). */
typedef struct {
    const uint8_t *unary, *params, *rem;
    Py_ssize_t unary_len, rem_len;
    int block_log2;
} Streams;

/* Decode all k positions (out == NULL: only check the streams), whose unary stream the
 * caller found to hold exactly k one bits; errors in the order the numpy decoder checks
 * them: any quotient too large for its tensor, then a position past the end. */
#define CHUNK 1024
static int rice_decode(const Streams *st, int64_t k, int64_t n, int64_t *out) {
    Rice s;
    rice_start(&s, st->unary, st->unary_len, st->params, st->block_log2, st->rem, st->rem_len,
               n);
    if (out != NULL) {
        if (rice_next(&s, k, out, NULL, 0) != RICE_OK) return RICE_GAP;
    } else {
        int64_t scratch[CHUNK];
        for (int64_t first = 0; first < k; first += CHUNK) {
            int64_t count = k - first < CHUNK ? k - first : CHUNK;
            if (rice_next(&s, count, scratch, NULL, 0) != RICE_OK) return RICE_GAP;
        }
    }
    return s.past_end ? RICE_POSITION : RICE_OK;
}

static PyObject *DecodeError;

/* Whether rice_patch prefetches each cache line it will write as it decodes the position
 * (measured with bench/diff_codec.py right after copying a model, lines in DRAM). On AMD
 * Zen the prefetches start the misses early and the apply runs about three times faster
 * than without them. On Intel cores the same prefetches stall the decoding loop once the
 * line fill buffers are full, and the loop that reads the old values gets as many misses
 * in flight by itself: without them the kernel is about a sixth faster. */
static int prefetch_while_decoding = 1;

/* True, or the DecodeError that a rice_decode status stands for. */
static PyObject *rice_result(int status, uint64_t ones, long long k, long long n) {
    switch (status) {
    case RICE_OK:
        Py_RETURN_TRUE;
    case RICE_COUNT:
        PyErr_Format(DecodeError, "unary stream codes %llu gaps, expected %lld",
                     (unsigned long long)ones, k);
        return NULL;
    case RICE_GAP:
        PyErr_SetString(DecodeError, "a gap runs past the end of the tensor");
        return NULL;
    default:
        PyErr_Format(DecodeError, "a position is outside a tensor of %lld", n);
        return NULL;
    }
}

/* 0 <= k <= n, and n small enough that n elements of 8 bytes make a buffer size (so no
 * size computed from them overflows); -1 with ValueError set otherwise. */
static int check_counts(long long k, long long n) {
    if (k < 0 || n < 0 || k > n || n > PY_SSIZE_T_MAX / 8) {
        PyErr_SetString(PyExc_ValueError, "bad k or n");
        return -1;
    }
    return 0;
}

/* Check a position section's header and stream lengths for k positions, as
 * diffs.positions.rice_streams does, with its messages: 1 and the streams in *out for a
 * RICE section; 0 for an ALL section (left to the Python code); -1 with DecodeError set. */
static int parse_section(const uint8_t *buf, Py_ssize_t len, int64_t k, Streams *out) {
    if (len < 1) {
        PyErr_SetString(DecodeError, "position section is empty");
        return -1;
    }
    if (buf[0] == 1) return 0;
    if (buf[0] != 0) {
        PyErr_Format(DecodeError, "unknown position coding mode %d", (int)buf[0]);
        return -1;
    }
    if (len < 10) {
        PyErr_SetString(DecodeError, "position section truncated in its header");
        return -1;
    }
    int block_log2 = buf[1];
    uint64_t unary_nbytes;
    memcpy(&unary_nbytes, buf + 2, 8);
    if (block_log2 < 8 || block_log2 > 20) {
        PyErr_Format(DecodeError, "position block size 2**%d out of range", block_log2);
        return -1;
    }
    uint64_t block = UINT64_C(1) << block_log2;
    uint64_t nblocks = k ? ((uint64_t)k - 1) / block + 1 : 0;
    uint64_t params_end = 10 + nblocks;
    if ((uint64_t)len < params_end || unary_nbytes > (uint64_t)len - params_end) {
        PyErr_SetString(DecodeError, "position section truncated");
        return -1;
    }
    const uint8_t *params = buf + 10;
    unsigned pmax = 0, pmin = nblocks ? 255 : 0;
    uint64_t head_sum = 0;
    for (uint64_t b = 0; b < nblocks; b++) {
        unsigned r = params[b];
        pmax = r > pmax ? r : pmax;
        pmin = r < pmin ? r : pmin;
        if (b + 1 < nblocks) head_sum += r;
    }
    if (pmax > 32) {
        PyErr_SetString(DecodeError, "Rice parameter above 32");
        return -1;
    }
    /* Every block holds `block` gaps but the last, which holds the rest. */
    uint64_t rem_bits = pmin == pmax ? (uint64_t)pmax * (uint64_t)k
                                     : block * head_sum + (uint64_t)params[nblocks - 1] *
                                                              ((uint64_t)k - (nblocks - 1) * block);
    uint64_t rem_start = params_end + unary_nbytes;
    uint64_t need = rem_start + (rem_bits + 7) / 8;
    if ((uint64_t)len != need) {
        PyErr_Format(DecodeError, "position section is %zd bytes, its streams need %llu", len,
                     (unsigned long long)need);
        return -1;
    }
    out->params = params;
    out->block_log2 = block_log2;
    out->unary = buf + params_end;
    out->unary_len = (Py_ssize_t)unary_nbytes;
    out->rem = buf + rem_start;
    out->rem_len = len - (Py_ssize_t)rem_start;
    return 1;
}

/* rice_decode(section, k, n): the k positions (below n) of a position section, as a
 * bytearray of k little-endian int64; None for an ALL section. Everything is checked that
 * can be before the k * 8 bytes are allocated: the header, the stream lengths and the
 * unary stream's count of one bits (so k is at most 8 times the section's length). */
static PyObject *py_rice_decode(PyObject *self, PyObject *args) {
    Py_buffer section;
    long long k, n;
    if (!PyArg_ParseTuple(args, "y*LL", &section, &k, &n)) return NULL;
    PyObject *result = NULL, *out = NULL;
    Streams st;
    if (check_counts(k, n) < 0) goto done;
    int rice = parse_section(section.buf, section.len, k, &st);
    if (rice <= 0) {
        if (rice == 0) result = Py_NewRef(Py_None);
        goto done;
    }
    uint64_t ones = count_ones(st.unary, st.unary_len);
    if (ones != (uint64_t)k) {
        rice_result(RICE_COUNT, ones, k, n);
        goto done;
    }
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(k * 8));
    if (out == NULL) goto done;
    int status;
    int64_t *positions = (int64_t *)PyByteArray_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    status = rice_decode(&st, k, n, positions);
    Py_END_ALLOW_THREADS
    if (status == RICE_OK) {
        result = out;
        out = NULL;
    } else {
        rice_result(status, ones, k, n);
    }
done:
    Py_XDECREF(out);
    PyBuffer_Release(&section);
    return result;
}

/* The first i whose position is not above the one before or not below size; -1 if none.
 * Checked before anything is written, so that a bad entry leaves the target untouched. */
static int64_t first_bad_position(const int64_t *pos, int64_t k, int64_t size) {
    int64_t prev = -1;
    for (int64_t i = 0; i < k; i++) {
        if (pos[i] <= prev || pos[i] >= size) return i;
        prev = pos[i];
    }
    return -1;
}

#define XOR_LOOP(T)                                                                   \
    do {                                                                              \
        T *t = (T *)target.buf;                                                       \
        const T *x = (const T *)values.buf;                                           \
        for (int64_t i = 0; i < k; i++) t[pos[i]] ^= x[i];                            \
    } while (0)

static PyObject *scatter(PyObject *args, int add) {
    Py_buffer target, positions, values;
    int width;
    if (!PyArg_ParseTuple(args, "w*y*y*i", &target, &positions, &values, &width)) return NULL;
    PyObject *result = NULL;
    int64_t k = positions.len / (Py_ssize_t)sizeof(int64_t);
    int ok_width = add ? width == 4 : (width == 1 || width == 2 || width == 4 || width == 8);
    if (!ok_width || positions.len % (Py_ssize_t)sizeof(int64_t) != 0 ||
        values.len != k * width || target.len % width != 0) {
        PyErr_SetString(PyExc_ValueError, "scatter: mismatched buffers");
        goto done;
    }
    const int64_t *pos = positions.buf;
    int64_t size = target.len / width, bad;
    Py_BEGIN_ALLOW_THREADS
    bad = first_bad_position(pos, k, size);
    if (bad >= 0) {
        /* nothing written */
    } else if (add) {
        float *t = target.buf;
        const float *d = values.buf;
        for (int64_t i = 0; i < k; i++) t[pos[i]] = t[pos[i]] + d[i]; /* binary32, RNE */
    } else if (width == 1) {
        XOR_LOOP(uint8_t);
    } else if (width == 2) {
        XOR_LOOP(uint16_t);
    } else if (width == 4) {
        XOR_LOOP(uint32_t);
    } else {
        XOR_LOOP(uint64_t);
    }
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        PyErr_Format(PyExc_IndexError,
                     "position %lld (entry %lld) is not above the previous one or not below %lld",
                     (long long)pos[bad], (long long)bad, (long long)size);
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&target);
    PyBuffer_Release(&positions);
    PyBuffer_Release(&values);
    return result;
}

/* Where an entry's values are: whole elements of `width` bytes one after another
 * (interleaved), or byte planes -- plane b holds byte b of every element, k bytes in all. */
typedef struct {
    const uint8_t *interleaved; /* NULL for planes */
    const uint8_t *plane[8];
} Values;

/* Element idx, of W bytes: from its planes when SHUF, else from the interleaved bytes. */
#define VALUE(T, W, SHUF, vals, idx, v)                                               \
    do {                                                                              \
        if (SHUF) {                                                                   \
            v = 0;                                                                    \
            for (int b = 0; b < (W); b++) v |= (T)((T)(vals)->plane[b][idx] << (8 * b)); \
        } else {                                                                      \
            memcpy(&v, (vals)->interleaved + (idx) * (W), (W));                       \
        }                                                                             \
    } while (0)

#define XOR_CHUNK(T, W, SHUF)                                                         \
    do {                                                                              \
        T *t = (T *)target;                                                           \
        for (int64_t j = 0; j < count; j++) {                                         \
            T v;                                                                      \
            VALUE(T, W, SHUF, vals, first + j, v);                                    \
            t[pos[j]] ^= v;                                                           \
        }                                                                             \
    } while (0)

#define ADD_CHUNK(SHUF)                                                               \
    do {                                                                              \
        float *t = (float *)target;                                                   \
        for (int64_t j = 0; j < count; j++) {                                         \
            uint32_t v;                                                               \
            float d;                                                                  \
            VALUE(uint32_t, 4, SHUF, vals, first + j, v);                             \
            memcpy(&d, &v, 4);                                                        \
            t[pos[j]] = t[pos[j]] + d; /* binary32, round to nearest even */          \
        }                                                                             \
    } while (0)

/* Apply values first .. first + count - 1 at the decoded positions pos. */
static void apply_chunk(uint8_t *target, const int64_t *pos, int64_t count, const Values *vals,
                        int64_t first, int width, int add) {
    int planes = vals->interleaved == NULL;
    if (add) {
        if (planes) ADD_CHUNK(1);
        else ADD_CHUNK(0);
        return;
    }
    switch (width * 2 + planes) {
    case 2: case 3: XOR_CHUNK(uint8_t, 1, 0); break;
    case 4: XOR_CHUNK(uint16_t, 2, 0); break;
    case 5: XOR_CHUNK(uint16_t, 2, 1); break;
    case 8: XOR_CHUNK(uint32_t, 4, 0); break;
    case 9: XOR_CHUNK(uint32_t, 4, 1); break;
    case 16: XOR_CHUNK(uint64_t, 8, 0); break;
    default: XOR_CHUNK(uint64_t, 8, 1); break;
    }
}

/* Copy the width-byte elements at pos out of the target (save) or back into it. */
#define KEEP_LOOP(T)                                                                  \
    do {                                                                              \
        T *t = (T *)target, *saved = (T *)kept;                                       \
        if (restore) {                                                                \
            for (int64_t j = 0; j < count; j++) t[pos[j]] = saved[j];                 \
        } else {                                                                      \
            for (int64_t j = 0; j < count; j++) saved[j] = t[pos[j]];                 \
        }                                                                             \
    } while (0)

static void keep_chunk(uint8_t *target, const int64_t *pos, int64_t count, int width,
                       uint8_t *kept, int restore) {
    switch (width) {
    case 1: KEEP_LOOP(uint8_t); break;
    case 2: KEEP_LOOP(uint16_t); break;
    case 4: KEEP_LOOP(uint32_t); break;
    default: KEEP_LOOP(uint64_t); break;
    }
}

/* Where the values of an entry of k elements of `width` bytes are. mask < 0: interleaved,
 * in raw. Else byte planes: plane b is the next plane of raw when bit b of mask is set,
 * else the next plane of packed. -1 with ValueError set when the buffers do not fit. */
static int values_layout(Values *v, const Py_buffer *raw, const Py_buffer *packed, int mask,
                         int width, int64_t k) {
    memset(v, 0, sizeof *v);
    const uint8_t *r = raw->buf, *p = packed->buf;
    int nraw = mask < 0 ? width : __builtin_popcount((unsigned)mask);
    if ((mask >= 0 && mask >> width) || raw->len != nraw * k || packed->len != (width - nraw) * k) {
        PyErr_SetString(PyExc_ValueError, "values do not fit their layout");
        return -1;
    }
    if (mask < 0) {
        v->interleaved = r;
        return 0;
    }
    for (int b = 0; b < width; b++) {
        if (mask >> b & 1) {
            v->plane[b] = r;
            r += k;
        } else {
            v->plane[b] = p;
            p += k;
        }
    }
    if (width == 1) v->interleaved = v->plane[0]; /* one plane is the elements themselves */
    return 0;
}

/*
 * Decode and apply in one pass over the streams. Each chunk of positions is checked
 * before it is written, and the elements it overwrites are kept: when a later chunk
 * turns out bad, the chunks already applied are decoded again and put back, so a bad
 * entry leaves the target as it was. (Without memory to keep them in, every stream is
 * checked in a first pass instead.) Errors are those rice_decode reports, in its order.
 */
static int rice_patch(const Streams *st, int64_t k, int64_t n, uint8_t *target,
                      const Values *vals, int width, int add, uint64_t *ones_found) {
    uint64_t ones = count_ones(st->unary, st->unary_len);
    if (ones != (uint64_t)k) {
        *ones_found = ones;
        return RICE_COUNT;
    }
    uint8_t *kept = k ? malloc((size_t)k * (size_t)width) : NULL;
    if (k && kept == NULL) {
        int status = rice_decode(st, k, n, NULL);
        if (status != RICE_OK) return status;
    }
    Rice s;
    int64_t pos[CHUNK];
    int64_t first = 0;
    int status = RICE_OK;
    rice_start(&s, st->unary, st->unary_len, st->params, st->block_log2, st->rem, st->rem_len,
               n);
    for (; first < k; first += CHUNK) {
        int64_t count = k - first < CHUNK ? k - first : CHUNK;
        if (rice_next(&s, count, pos, prefetch_while_decoding ? target : NULL, width) !=
            RICE_OK) {
            status = RICE_GAP;
            break;
        }
        if (s.past_end) {
            /* numpy checks every quotient before any position: look on for a bad one */
            status = RICE_POSITION;
            for (int64_t rest = first + count; rest < k; rest += CHUNK) {
                int64_t more = k - rest < CHUNK ? k - rest : CHUNK;
                if (rice_next(&s, more, pos, NULL, 0) != RICE_OK) {
                    status = RICE_GAP;
                    break;
                }
            }
            break;
        }
        if (kept != NULL) keep_chunk(target, pos, count, width, kept + first * width, 0);
        apply_chunk(target, pos, count, vals, first, width, add);
    }
    if (status != RICE_OK && kept != NULL) { /* put back the chunks before `first` */
        rice_start(&s, st->unary, st->unary_len, st->params, st->block_log2, st->rem,
                   st->rem_len, n);
        for (int64_t done = 0; done < first; done += CHUNK) {
            int64_t count = first - done < CHUNK ? first - done : CHUNK;
            rice_next(&s, count, pos, NULL, 0);
            keep_chunk(target, pos, count, width, kept + done * width, 1);
        }
    }
    free(kept);
    return status;
}

/* patch_section(section, k, n, target, raw, packed, mask, width, add): decode the position
 * section of an entry and apply its values there in one go (XOR, or binary32 addition when
 * add), never holding the k positions. False, with nothing done, for an ALL section; bad
 * streams raise DecodeError and leave the target as it was. */
static PyObject *py_patch_section(PyObject *self, PyObject *args) {
    Py_buffer section, target, raw, packed;
    int mask, width, add;
    long long k, n;
    if (!PyArg_ParseTuple(args, "y*LLw*y*y*iip", &section, &k, &n, &target, &raw, &packed,
                          &mask, &width, &add))
        return NULL;
    PyObject *result = NULL;
    Values vals;
    Streams st;
    if (check_counts(k, n) < 0) goto done;
    int ok_width = add ? width == 4 : (width == 1 || width == 2 || width == 4 || width == 8);
    if (!ok_width || target.len != n * width) {
        PyErr_SetString(PyExc_ValueError, "patch_section: bad width or target size");
        goto done;
    }
    if (values_layout(&vals, &raw, &packed, mask, width, k) < 0) goto done;
    int rice = parse_section(section.buf, section.len, k, &st);
    if (rice <= 0) {
        if (rice == 0) result = Py_NewRef(Py_False);
        goto done;
    }
    uint64_t ones = 0;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = rice_patch(&st, k, n, target.buf, &vals, width, add, &ones);
    Py_END_ALLOW_THREADS
    result = rice_result(status, ones, k, n);
done:
    PyBuffer_Release(&section);
    PyBuffer_Release(&target);
    PyBuffer_Release(&raw);
    PyBuffer_Release(&packed);
    return result;
}

static PyObject *py_xor_scatter(PyObject *self, PyObject *args) { return scatter(args, 0); }

static PyObject *py_add_scatter_f32(PyObject *self, PyObject *args) {
    return scatter(args, 1);
}

static PyMethodDef methods[] = {
    {"rice_decode", py_rice_decode, METH_VARARGS,
     "rice_decode(section, k, n)\n\n"
     "The k positions (below n) of a position section, as a bytearray of int64; None for "
     "an ALL section; raise DecodeError, before allocating them, on bad streams."},
    {"patch_section", py_patch_section, METH_VARARGS,
     "patch_section(section, k, n, target, raw, packed, mask, width, add)\n\n"
     "Decode a position section of k positions below n and apply values there (XOR, or "
     "binary32 addition when add), never holding the positions. Values: interleaved in raw "
     "(mask -1), or byte planes, plane b the next of raw where bit b of mask is set, else "
     "the next of packed. False, doing nothing, for an ALL section; raise DecodeError, "
     "writing nothing, on bad streams."},
    {"xor_scatter", py_xor_scatter, METH_VARARGS,
     "xor_scatter(target, positions, values, width)\n\n"
     "target[p[i]] ^= values[i] for width-byte unsigned elements; positions strictly increasing."},
    {"add_scatter_f32", py_add_scatter_f32, METH_VARARGS,
     "add_scatter_f32(target, positions, deltas, 4)\n\n"
     "target[p[i]] = target[p[i]] + deltas[i] in binary32; positions strictly increasing."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "diffs._native", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    prefetch_while_decoding = !__builtin_cpu_is("intel");
#endif
    if (PyModule_AddIntConstant(m, "PREFETCH_WHILE_DECODING", prefetch_while_decoding) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    DecodeError = PyErr_NewException("diffs._native.DecodeError", PyExc_ValueError, NULL);
    if (DecodeError == NULL || PyModule_AddObjectRef(m, "DecodeError", DecodeError) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
