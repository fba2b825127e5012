/* The normalizer's hot path in C: one Redis stream entry, as the flat [name, value, ...] list hiredis returns,
 * to a FlowEvent, or None for anything it does not handle, which the Python normalizer (worker/normalize.py) then
 * decides as before. It computes exactly what Normalizer._build_fast computes and returns an event only where that
 * would, so both give the same events (tests/test_normalize_shapes.py runs them side by side); every rejection is
 * the Python path's. Optional: built when a C compiler is present (hatch_build.py), else the Python path alone runs.
 *
 * Called from here: orjson to read an envelope's JSON and to write non-string attribute values as JSON text, and
 * normalize._common_timestamp_ms for timestamps that are neither epoch digits nor the common ISO-8601 forms. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_ID_CHARS 256
#define MAX_EVENT_TYPE_CHARS 128
#define MAX_ATTRIBUTES 256
#define MAX_ENTRY_BYTES (1 << 20)
#define SECONDS_MS_BOUNDARY 100000000000LL
#define MAX_TS_MS 7258118400000LL
#define FLOW_EVENT_FIELDS 12
#define CONTENT_DIGEST_BYTES 6

/* Set once by configure(): the FlowEvent type and the Python helpers named above. */
static PyTypeObject *flow_event_type = NULL;
static PyObject *loads_fn = NULL;
static PyObject *common_ts_fn = NULL;
static PyObject *dumps_fn = NULL;

static PyObject *s_session_id, *s_node_id, *s_event_type, *s_user_id, *s_parent_id, *s_timestamp, *s_event_id,
    *s_data, *s_payload, *s_empty;

static PyObject *reserved[7];
static Py_hash_t reserved_hash[7];

/* A key of the contract's own fields? By hash first (a str caches its hash; dict keys have theirs computed). */
static int is_reserved(PyObject *key) {
    Py_hash_t hash = PyObject_Hash(key);
    if (hash == -1) {
        PyErr_Clear();
        return 0;
    }
    for (int i = 0; i < 7; i++) {
        if (hash == reserved_hash[i] && (key == reserved[i] || PyUnicode_Compare(key, reserved[i]) == 0)) return 1;
    }
    return 0;
}

/* str.isspace(): every character whitespace (and at least one). */
static int all_space(PyObject *s) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    if (n == 0) return 0;
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, i))) return 0;
    }
    return 1;
}

/* A required id: exact str, 0 < len <= max, not all whitespace. */
static int plain_id(PyObject *v, Py_ssize_t max_chars) {
    if (v == NULL || !PyUnicode_CheckExact(v)) return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(v);
    return n > 0 && n <= max_chars && !all_space(v);
}

/* None or "" (what the contract reads as absent). */
static int absent(PyObject *v) {
    return v == NULL || v == Py_None || (PyUnicode_CheckExact(v) && PyUnicode_GET_LENGTH(v) == 0);
}

/* ASCII digits only, at most max_digits of them, as an integer; -1 if not that. */
static long long ascii_digits(PyObject *s, Py_ssize_t start, Py_ssize_t end, Py_ssize_t max_digits) {
    if (!PyUnicode_IS_ASCII(s) || end <= start || end - start > max_digits) return -1;
    const Py_UCS1 *c = PyUnicode_1BYTE_DATA(s);
    long long value = 0;
    for (Py_ssize_t i = start; i < end; i++) {
        if (c[i] < '0' || c[i] > '9') return -1;
        value = value * 10 + (c[i] - '0');
    }
    return value;
}

/* The entry id's milliseconds (the part before '-'), or -1. */
static long long entry_id_ms(PyObject *entry_id) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(entry_id);
    Py_ssize_t dash = PyUnicode_FindChar(entry_id, '-', 0, n, 1);
    if (dash < 0) dash = n;
    return ascii_digits(entry_id, 0, dash, 18);
}

/* -- BLAKE2b (RFC 7693), unkeyed, for the content digest of derived event ids: the same bytes as Python's
 * hashlib.blake2b(joined, digest_size=6).hexdigest() (tests/test_normalize_fast.py compares them). */

static const uint64_t blake2b_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t blake2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64_le(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

#define B2B_G(a, b, c, d, x, y)         \
    do {                                \
        v[a] = v[a] + v[b] + (x);       \
        v[d] = rotr64(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];             \
        v[b] = rotr64(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y);       \
        v[d] = rotr64(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];             \
        v[b] = rotr64(v[b] ^ v[c], 63); \
    } while (0)

static void blake2b_compress(uint64_t h[8], const uint8_t block[128], uint64_t bytes_so_far, int last) {
    uint64_t v[16], m[16];
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = blake2b_iv[i];
    }
    v[12] ^= bytes_so_far;  /* the high word of the 128-bit counter stays 0: entries are < 2**64 bytes */
    if (last) v[14] = ~v[14];
    for (int i = 0; i < 16; i++) m[i] = load64_le(block + 8 * i);
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = blake2b_sigma[r];
        B2B_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B2B_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B2B_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B2B_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B2B_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B2B_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B2B_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B2B_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* BLAKE2b of data with a digest of out_len bytes (1..64), as lowercase hex (2 * out_len chars) into hex. */
static void blake2b_hex(const uint8_t *data, Py_ssize_t len, int out_len, char *hex) {
    uint64_t h[8];
    memcpy(h, blake2b_iv, sizeof h);
    h[0] ^= 0x01010000ULL ^ (uint64_t)out_len;  /* parameter block: digest length, no key, fanout/depth 1 */
    uint64_t done = 0;
    while (len - (Py_ssize_t)done > 128) {
        blake2b_compress(h, data + done, done + 128, 0);
        done += 128;
    }
    uint8_t block[128] = {0};
    memcpy(block, data + done, (size_t)(len - (Py_ssize_t)done));
    blake2b_compress(h, block, (uint64_t)len, 1);
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < out_len; i++) {
        uint8_t byte = (uint8_t)(h[i / 8] >> (8 * (i % 8)));
        hex[2 * i] = digits[byte >> 4];
        hex[2 * i + 1] = digits[byte & 15];
    }
}

/* -- ISO-8601: the common forms, computed as round(datetime.fromisoformat(text).timestamp() * 1000) is (naive =
 * UTC): YYYY-MM-DD, 'T' or ' ', HH:MM:SS, an optional fraction of 1 to 6 digits, then nothing, 'Z' or +HH:MM /
 * -HH:MM. Anything else (and any value fromisoformat would refuse) returns -1: the Python path decides it. */

static int digits_at(const Py_UCS1 *c, Py_ssize_t at, int count) {
    int value = 0;
    for (int i = 0; i < count; i++) {
        if (c[at + i] < '0' || c[at + i] > '9') return -1;
        value = value * 10 + (c[at + i] - '0');
    }
    return value;
}

/* Days from 1970-01-01 to a proleptic Gregorian date (valid dates only). */
static long long days_from_civil(long long y, int m, int d) {
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    long long yoe = y - era * 400;
    long long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int days_in_month(int y, int m) {
    static const int days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (m == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0)) return 29;
    return days[m - 1];
}

static long long iso_ms(PyObject *text) {
    if (!PyUnicode_IS_ASCII(text)) return -1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    const Py_UCS1 *c = PyUnicode_1BYTE_DATA(text);
    if (n < 19 || c[4] != '-' || c[7] != '-' || (c[10] != 'T' && c[10] != ' ') || c[13] != ':' || c[16] != ':')
        return -1;
    int year = digits_at(c, 0, 4), month = digits_at(c, 5, 2), day = digits_at(c, 8, 2);
    int hour = digits_at(c, 11, 2), minute = digits_at(c, 14, 2), second = digits_at(c, 17, 2);
    if (year < 1 || month < 1 || month > 12 || day < 1 || hour < 0 || hour > 23 || minute < 0 || minute > 59
        || second < 0 || second > 59 || day > days_in_month(year, month)) return -1;
    Py_ssize_t at = 19;
    long long micros = 0;
    if (at < n && c[at] == '.') {
        int digits = 0;
        at++;
        while (at < n && c[at] >= '0' && c[at] <= '9') {
            if (++digits > 6) return -1;
            micros = micros * 10 + (c[at] - '0');
            at++;
        }
        if (digits == 0) return -1;
        for (int i = digits; i < 6; i++) micros *= 10;
    }
    long long offset_s = 0;
    if (at < n && c[at] == 'Z') {
        at++;
    } else if (at < n && (c[at] == '+' || c[at] == '-')) {
        if (n - at != 6 || c[at + 3] != ':') return -1;
        int oh = digits_at(c, at + 1, 2), om = digits_at(c, at + 4, 2);
        if (oh < 0 || oh > 23 || om < 0 || om > 59) return -1;
        offset_s = (c[at] == '+' ? 1 : -1) * (oh * 3600LL + om * 60LL);
        at += 6;
    }
    if (at != n) return -1;
    long long seconds = days_from_civil(year, month, day) * 86400LL + hour * 3600LL + minute * 60LL + second
                        - offset_s;
    long long total_us = seconds * 1000000LL + micros;
    if (total_us < 0 || total_us >= MAX_TS_MS * 1000LL) return -1;
    /* timedelta.total_seconds() divides the exact microseconds (< 2**53 here: exact as a double) by 10**6, correctly
     * rounded as this division is; then * 1000 and round() half to even, as nearbyint does by default. */
    double ms = nearbyint(((double)total_us / 1e6) * 1000.0);
    if (ms < 0 || ms >= (double)MAX_TS_MS) return -1;
    return (long long)ms;
}

/* Field names repeat from entry to entry: each distinct short name is decoded once and shared (interned), so
 * entries hold no copies of their attribute names. Bounded, as names come from producers: at most NAME_CACHE_MAX
 * names of at most NAME_CACHE_MAX_BYTES bytes; any other name is decoded anew each time. */
#define NAME_CACHE_MAX 4096
#define NAME_CACHE_MAX_BYTES 64
static PyObject *name_cache = NULL;

static PyObject *field_name(PyObject *raw) {
    if (PyBytes_GET_SIZE(raw) > NAME_CACHE_MAX_BYTES) {
        return PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), NULL);
    }
    PyObject *name = PyDict_GetItemWithError(name_cache, raw);
    if (name != NULL) return Py_NewRef(name);
    if (PyErr_Occurred()) return NULL;
    name = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), NULL);
    if (name == NULL) return NULL;
    PyUnicode_InternInPlace(&name);
    if (PyDict_GET_SIZE(name_cache) < NAME_CACHE_MAX && PyDict_SetItem(name_cache, raw, name) < 0) {
        Py_DECREF(name);
        return NULL;
    }
    return name;
}

/* {name: value} of the entry's pairs, decoded as strict UTF-8; NULL without an error set when a part is not. */
static PyObject *decode_pairs(PyObject *pairs) {
    Py_ssize_t n = PyList_GET_SIZE(pairs);
    PyObject *record = PyDict_New();
    if (record == NULL) return NULL;
    for (Py_ssize_t i = 0; i + 1 < n; i += 2) {
        PyObject *k = PyList_GET_ITEM(pairs, i), *v = PyList_GET_ITEM(pairs, i + 1);
        if (!PyBytes_CheckExact(k) || !PyBytes_CheckExact(v)) goto unusual;
        PyObject *key = field_name(k);
        if (key == NULL) goto unusual;
        PyObject *value = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), NULL);
        if (value == NULL) {
            Py_DECREF(key);
            goto unusual;
        }
        int failed = PyDict_SetItem(record, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (failed) goto unusual;
    }
    if (PyDict_GET_SIZE(record) != n / 2) goto unusual;  /* a name repeated: the Python path rejects the entry */
    return record;
unusual:
    PyErr_Clear();
    Py_DECREF(record);
    return NULL;
}

/* The envelope shape merged into the flat fields, as normalize._unwrap does it (the flat fields beside the envelope
 * are defaults); NULL (no error) where _unwrap would reject, for the Python path to say why. */
/* A run of 20 digits: the document may hold an integer beyond 64 bits, which orjson would round to a float; the
 * Python path reads such documents exactly. */
static int has_long_digit_run(PyObject *text) {
    if (!PyUnicode_Check(text)) return 0;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), run = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c >= '0' && c <= '9') {
            if (++run >= 20) return 1;
        } else {
            run = 0;
        }
    }
    return 0;
}

/* How many keys a valid JSON document spells out (normalize._json_key_tokens): a string followed by a colon. */
#define COUNT_JSON_KEYS(T)                                                                                \
    do {                                                                                                  \
        const T *c = (const T *)data;                                                                     \
        while (i < n) {                                                                                   \
            if (c[i++] != '"') continue;                                                                  \
            while (i < n && c[i] != '"') i += c[i] == '\\' ? 2 : 1;                                       \
            i++;                                                                                          \
            while (i < n && (c[i] == ' ' || c[i] == '\t' || c[i] == '\n' || c[i] == '\r')) i++;            \
            if (i < n && c[i] == ':') keys++;                                                             \
        }                                                                                                 \
    } while (0)

static Py_ssize_t json_key_tokens(PyObject *text) {
    if (!PyUnicode_Check(text)) return -1;  /* not a document read here: the Python path decides */
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), keys = 0, i = 0;
    switch (PyUnicode_KIND(text)) {
        case PyUnicode_1BYTE_KIND: COUNT_JSON_KEYS(Py_UCS1); break;
        case PyUnicode_2BYTE_KIND: COUNT_JSON_KEYS(Py_UCS2); break;
        default: COUNT_JSON_KEYS(Py_UCS4); break;
    }
    return keys;
}

/* How many keys the parsed document kept, in objects at any depth (normalize._object_keys); orjson nests at most
 * 1,024 deep. */
static Py_ssize_t object_keys(PyObject *value) {
    Py_ssize_t count = 0;
    if (PyDict_Check(value)) {
        PyObject *key, *item;
        Py_ssize_t pos = 0;
        count = PyDict_GET_SIZE(value);
        while (PyDict_Next(value, &pos, &key, &item)) count += object_keys(item);
    } else if (PyList_Check(value)) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++) count += object_keys(PyList_GET_ITEM(value, i));
    }
    return count;
}

static PyObject *unwrap(PyObject *record) {
    if (PyDict_Contains(record, s_session_id) == 1) return record;
    PyObject *envelope = PyDict_Contains(record, s_data) == 1 ? s_data
                         : PyDict_Contains(record, s_payload) == 1 ? s_payload : NULL;
    if (envelope == NULL) return record;
    PyObject *text = PyDict_GetItemWithError(record, envelope);
    PyObject *decoded = text == NULL || has_long_digit_run(text) ? NULL : PyObject_CallOneArg(loads_fn, text);
    /* A key repeated in one object: the parser kept one value; the Python path rejects the entry. */
    if (decoded == NULL || !PyDict_Check(decoded) || json_key_tokens(text) != object_keys(decoded)
        || PyDict_DelItem(record, envelope) < 0 || PyDict_Update(record, decoded) < 0) {
        PyErr_Clear();
        Py_XDECREF(decoded);
        Py_DECREF(record);
        return NULL;
    }
    Py_DECREF(decoded);
    return record;
}

/* float(text) or a JSON number as _common_timestamp_ms takes it: seconds below SECONDS_MS_BOUNDARY, else ms;
 * rounded half to even as round() is; -1 when not finite or outside 1970..2200 (the Python path decides). */
static long long epoch_number_ms(double number) {
    if (!isfinite(number)) return -1;
    double ms = fabs(number) < (double)SECONDS_MS_BOUNDARY ? nearbyint(number * 1000.0) : nearbyint(number);
    if (!(ms >= 0 && ms < (double)MAX_TS_MS)) return -1;
    return (long long)ms;
}

/* Epoch seconds with a fraction, as ASCII digits '.' digits only (parsed by Python's own float parser, as float()
 * parses it); -1 for anything else. */
static long long decimal_seconds_ms(PyObject *text) {
    if (!PyUnicode_IS_ASCII(text)) return -1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    const Py_UCS1 *c = PyUnicode_1BYTE_DATA(text);
    Py_ssize_t dot = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (c[i] == '.' && dot < 0 && i > 0 && i < n - 1) dot = i;
        else if (c[i] < '0' || c[i] > '9') return -1;
    }
    if (dot < 0 || n > 32) return -1;
    char *end = NULL;
    double number = PyOS_string_to_double((const char *)c, &end, NULL);
    if ((number == -1.0 && PyErr_Occurred()) || end != (const char *)c + n) {
        PyErr_Clear();
        return -1;
    }
    return epoch_number_ms(number);
}

/* The event's ts in ms as a Python int, or NULL (no error) to leave the entry to the Python path. */
static PyObject *timestamp_ms(PyObject *stamp, PyObject *entry_id) {
    long long ms;
    if (absent(stamp)) {
        ms = entry_id_ms(entry_id);
        if (ms < 0 || ms >= MAX_TS_MS) return NULL;  /* a chosen id's time: the checked path rejects it */
        return PyLong_FromLongLong(ms);
    }
    if (PyUnicode_CheckExact(stamp)) {
        ms = ascii_digits(stamp, 0, PyUnicode_GET_LENGTH(stamp), 16);
        if (ms >= 0) {
            if (ms < SECONDS_MS_BOUNDARY) ms *= 1000;
            if (ms >= MAX_TS_MS) return NULL;
            return PyLong_FromLongLong(ms);
        }
        ms = iso_ms(stamp);
        if (ms < 0) ms = decimal_seconds_ms(stamp);
        if (ms >= 0) return PyLong_FromLongLong(ms);
    } else if (PyLong_CheckExact(stamp)) {  /* a JSON integer (not a boolean: the checked parse rejects those) */
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(stamp, &overflow);
        if (!overflow && v >= 0 && !(v == -1 && PyErr_Occurred())) {
            ms = v < SECONDS_MS_BOUNDARY ? v * 1000 : v;
            if (ms < MAX_TS_MS) return PyLong_FromLongLong(ms);
        }
        PyErr_Clear();
    } else if (PyFloat_CheckExact(stamp)) {
        ms = epoch_number_ms(PyFloat_AS_DOUBLE(stamp));
        if (ms >= 0) return PyLong_FromLongLong(ms);
    }
    PyObject *common = PyObject_CallOneArg(common_ts_fn, stamp);
    if (common == NULL || common == Py_None) {
        PyErr_Clear();
        Py_XDECREF(common);
        return NULL;
    }
    return common;
}

/* stream + "/" + entry id + "/" + content digest; NULL (no error) on failure. */
static PyObject *derived_event_id(PyObject *stream, PyObject *entry_id, PyObject *joined) {
    char hex[2 * CONTENT_DIGEST_BYTES + 1];
    hex[0] = '/';
    blake2b_hex((const uint8_t *)PyBytes_AS_STRING(joined), PyBytes_GET_SIZE(joined), CONTENT_DIGEST_BYTES, hex + 1);
    Py_ssize_t sl = PyUnicode_GET_LENGTH(stream), el = PyUnicode_GET_LENGTH(entry_id);
    Py_UCS4 maxchar = Py_MAX(PyUnicode_MAX_CHAR_VALUE(stream), PyUnicode_MAX_CHAR_VALUE(entry_id));
    PyObject *id = PyUnicode_New(sl + 1 + el + 1 + 2 * CONTENT_DIGEST_BYTES, maxchar);
    if (id == NULL) {
        PyErr_Clear();
        return NULL;
    }
    int kind = PyUnicode_KIND(id);
    void *data = PyUnicode_DATA(id);
    if (PyUnicode_CopyCharacters(id, 0, stream, 0, sl) < 0
        || PyUnicode_CopyCharacters(id, sl + 1, entry_id, 0, el) < 0) {
        PyErr_Clear();
        Py_DECREF(id);
        return NULL;
    }
    PyUnicode_WRITE(kind, data, sl, '/');
    for (int i = 0; i <= 2 * CONTENT_DIGEST_BYTES; i++) PyUnicode_WRITE(kind, data, sl + 1 + el + i, hex[i]);
    return id;
}

/* Every field that is not reserved, as text; NULL (no error) to leave the entry to the Python path. */
static PyObject *attributes(PyObject *record) {
    PyObject *attrs = PyDict_New();
    if (attrs == NULL) return NULL;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(record, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key)) goto fail;
        if (is_reserved(key)) continue;
        if (PyUnicode_CheckExact(value)) {
            if (PyDict_SetItem(attrs, key, value)) goto fail;
            continue;
        }
        PyObject *json = PyObject_CallOneArg(dumps_fn, value);
        if (json == NULL || !PyBytes_Check(json)) {
            Py_XDECREF(json);
            goto fail;
        }
        PyObject *text = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(json), PyBytes_GET_SIZE(json), NULL);
        Py_DECREF(json);
        if (text == NULL) goto fail;
        int failed = PyDict_SetItem(attrs, key, text);
        Py_DECREF(text);
        if (failed) goto fail;
    }
    if (PyDict_GET_SIZE(attrs) > MAX_ATTRIBUTES) goto fail;
    return attrs;
fail:
    PyErr_Clear();
    Py_DECREF(attrs);
    return NULL;
}

static PyObject *new_flow_event(PyObject **items) {
    PyObject *event = flow_event_type->tp_alloc(flow_event_type, FLOW_EVENT_FIELDS);
    if (event == NULL) return NULL;
    for (int i = 0; i < FLOW_EVENT_FIELDS; i++) {
        Py_INCREF(items[i]);
        PyTuple_SET_ITEM(event, i, items[i]);
    }
    return event;
}

/* normalize_pairs(stream, entry_id, pairs, joined, end_types, error_types) -> FlowEvent | None */
static PyObject *normalize_pairs(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "normalize_pairs takes 6 arguments");
        return NULL;
    }
    if (flow_event_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fastpath.configure() was not called");
        return NULL;
    }
    PyObject *stream = args[0], *entry_id = args[1], *pairs = args[2], *joined = args[3];
    PyObject *end_types = args[4], *error_types = args[5];
    if (!PyUnicode_CheckExact(stream) || !PyUnicode_CheckExact(entry_id) || !PyList_CheckExact(pairs)
        || !PyBytes_CheckExact(joined) || !PyAnySet_Check(end_types) || !PyAnySet_Check(error_types)) {
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PyList_GET_SIZE(pairs);
    if (n == 0 || n % 2 || PyBytes_GET_SIZE(joined) - n + 1 > MAX_ENTRY_BYTES) Py_RETURN_NONE;

    PyObject *record = decode_pairs(pairs);
    if (record == NULL) Py_RETURN_NONE;
    record = unwrap(record);
    if (record == NULL) Py_RETURN_NONE;

    PyObject *result = Py_None;  /* borrowed until an event is built */
    PyObject *user_id = NULL, *parent_id = NULL, *ts = NULL, *event_id = NULL, *attrs = NULL;
    PyObject *is_end = NULL, *is_error = NULL;

    PyObject *session_id = PyDict_GetItemWithError(record, s_session_id);
    PyObject *node_id = PyDict_GetItemWithError(record, s_node_id);
    PyObject *event_type = PyDict_GetItemWithError(record, s_event_type);
    if (!plain_id(session_id, MAX_ID_CHARS) || !plain_id(node_id, MAX_ID_CHARS)
        || !plain_id(event_type, MAX_EVENT_TYPE_CHARS)) goto done;

    PyObject *user = PyDict_GetItemWithError(record, s_user_id);
    if (absent(user)) {
        Py_ssize_t len = PyUnicode_GET_LENGTH(stream);
        Py_ssize_t colon = PyUnicode_FindChar(stream, ':', 0, len, -1);
        if (colon < 0 || len - colon - 1 == 0 || len - colon - 1 > MAX_ID_CHARS) goto done;
        user_id = PyUnicode_Substring(stream, colon + 1, len);
        if (user_id == NULL) goto done;
    } else {
        if (!PyUnicode_CheckExact(user) || PyUnicode_GET_LENGTH(user) > MAX_ID_CHARS || all_space(user)) goto done;
        user_id = Py_NewRef(user);
    }

    PyObject *parent = PyDict_GetItemWithError(record, s_parent_id);
    if (parent == NULL || parent == Py_None) {
        parent_id = Py_NewRef(s_empty);
    } else {
        if (!PyUnicode_CheckExact(parent) || PyUnicode_GET_LENGTH(parent) > MAX_ID_CHARS) goto done;
        int same = PyUnicode_Compare(parent, node_id);
        if (same == 0 || (same == -1 && PyErr_Occurred())) goto done;
        parent_id = Py_NewRef(parent);
    }

    ts = timestamp_ms(PyDict_GetItemWithError(record, s_timestamp), entry_id);
    if (ts == NULL) goto done;

    PyObject *given_id = PyDict_GetItemWithError(record, s_event_id);
    if (absent(given_id) || (PyUnicode_CheckExact(given_id) && all_space(given_id))) {
        event_id = derived_event_id(stream, entry_id, joined);
        if (event_id == NULL) goto done;
    } else {
        if (!PyUnicode_CheckExact(given_id) || PyUnicode_GET_LENGTH(given_id) > MAX_ID_CHARS) goto done;
        event_id = Py_NewRef(given_id);
    }

    attrs = attributes(record);
    if (attrs == NULL) goto done;
    int ends = PySet_Contains(end_types, event_type), errs = PySet_Contains(error_types, event_type);
    if (ends < 0 || errs < 0) goto done;
    is_end = PyLong_FromLong(ends);
    is_error = PyLong_FromLong(errs);
    if (is_end == NULL || is_error == NULL) goto done;

    PyObject *items[FLOW_EVENT_FIELDS] = {event_id, user_id, session_id, node_id, parent_id, event_type, ts, attrs,
                                          stream, entry_id, is_end, is_error};
    PyObject *event = new_flow_event(items);
    if (event != NULL) result = event;

done:
    PyErr_Clear();
    Py_XDECREF(user_id);
    Py_XDECREF(parent_id);
    Py_XDECREF(ts);
    Py_XDECREF(event_id);
    Py_XDECREF(attrs);
    Py_XDECREF(is_end);
    Py_XDECREF(is_error);
    Py_DECREF(record);
    if (result == Py_None) Py_RETURN_NONE;
    return result;
}

/* -- A read's new entries into a batch: what Pipeline._add_new does per entry, in one C loop per stream. Per entry:
 * the id decoded, the entry's exact bytes joined (its size, its digest's input), normalize_pairs, and where that
 * returns None (anything unusual, every rejection) the Python normalizer (``fallback``); the result appended to the
 * batch's events or rejections and the id to the stream's id list. It stops when the batch has no rows or bytes left
 * (checked before each entry, as Batch.full is) and says where, so the caller rolls the batch and goes on. */

/* b"\x00".join(pairs) for a list of bytes; NULL with no exception set for anything else. */
static PyObject *joined_entry(PyObject *pairs) {
    Py_ssize_t n = PyList_GET_SIZE(pairs), total = n > 0 ? n - 1 : 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *part = PyList_GET_ITEM(pairs, i);
        if (!PyBytes_CheckExact(part)) return NULL;
        total += PyBytes_GET_SIZE(part);
    }
    PyObject *joined = PyBytes_FromStringAndSize(NULL, total);
    if (joined == NULL) return NULL;
    char *out = PyBytes_AS_STRING(joined);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *part = PyList_GET_ITEM(pairs, i);
        if (i > 0) *out++ = '\0';
        memcpy(out, PyBytes_AS_STRING(part), (size_t)PyBytes_GET_SIZE(part));
        out += PyBytes_GET_SIZE(part);
    }
    return joined;
}

/* fill_batch(stream, items, start, rows_left, bytes_left, events, rejections, ids, fallback, end_types, error_types)
 *   -> (next, rows, bytes, largest) */
static PyObject *fill_batch(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11 || !PyUnicode_CheckExact(args[0]) || !PyList_CheckExact(args[1]) || !PyLong_Check(args[2])
        || !PyLong_Check(args[3]) || !PyLong_Check(args[4]) || !PyList_CheckExact(args[5])
        || !PyList_CheckExact(args[6]) || !PyList_CheckExact(args[7]) || !PyCallable_Check(args[8])) {
        PyErr_SetString(PyExc_TypeError, "fill_batch(stream: str, items: list, start: int, rows_left: int, "
                        "bytes_left: int, events: list, rejections: list, ids: list, fallback, end_types, "
                        "error_types)");
        return NULL;
    }
    PyObject *stream = args[0], *items = args[1], *events = args[5], *rejections = args[6], *ids = args[7];
    PyObject *fallback = args[8];
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    long long rows_left = PyLong_AsLongLong(args[3]), bytes_left = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(items), i = start < 0 ? 0 : start;
    long long rows = 0, bytes = 0, largest = 0;
    for (; i < n && rows < rows_left && bytes < bytes_left; i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        if (!(PyList_CheckExact(item) || PyTuple_CheckExact(item)) || PySequence_Fast_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_ValueError, "a stream entry is not an [id, fields] pair");
            return NULL;
        }
        PyObject *raw_id = PySequence_Fast_GET_ITEM(item, 0), *pairs = PySequence_Fast_GET_ITEM(item, 1);
        if (!PyBytes_CheckExact(raw_id)) {
            PyErr_SetString(PyExc_TypeError, "a stream entry id is not bytes");
            return NULL;
        }
        PyObject *entry_id = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw_id), PyBytes_GET_SIZE(raw_id), "strict");
        if (entry_id == NULL) return NULL;
        PyObject *joined = PyList_CheckExact(pairs) ? joined_entry(pairs) : NULL;
        PyObject *result = NULL;
        long long size = 0;
        if (joined != NULL) {
            size = (long long)PyBytes_GET_SIZE(joined) - PyList_GET_SIZE(pairs) + 1;
            PyObject *call[6] = {stream, entry_id, pairs, joined, args[9], args[10]};
            result = PyList_GET_SIZE(pairs) > 0 ? normalize_pairs(NULL, call, 6) : Py_NewRef(Py_None);
        } else if (!PyErr_Occurred()) {
            joined = Py_NewRef(Py_None);  /* not a list of bytes: the Python normalizer decides */
            result = Py_NewRef(Py_None);
        }
        if (result == Py_None) {
            Py_DECREF(result);
            PyObject *call[4] = {stream, entry_id, pairs, joined};
            result = PyObject_Vectorcall(fallback, call, 4, NULL);
        }
        Py_XDECREF(joined);
        if (result == NULL || PyList_Append(ids, entry_id) < 0) {
            Py_DECREF(entry_id);
            Py_XDECREF(result);
            return NULL;
        }
        Py_DECREF(entry_id);
        int appended = PyList_Append(Py_IS_TYPE(result, flow_event_type) ? events : rejections, result);
        Py_DECREF(result);
        if (appended < 0) return NULL;
        rows++;
        bytes += size;
        if (size > largest) largest = size;
    }
    return Py_BuildValue("(nLLL)", i, rows, bytes, largest);
}

/* -- An insert as one ClickHouse Native block, built from tuples (FlowEvents, Rejections) in one pass per column: what
 * clickhouse-connect builds in Python, without the column lists and per-value calls. The caller names each column and
 * its type, in the tuples' field order (LowCardinality columns are sent as String: the engine converts on insert),
 * then one constant DateTime64 column (the insert's time) is appended. Returns (block, token), or None for anything
 * unexpected (then the sink builds the insert in Python). The token is BLAKE2b-160 of the block before its constant
 * column: a function of the exact rows, as the dedup token must be (worker/sink.py). */

/* The block is written twice: once to measure it (data NULL: only len counts), then into a bytes object of exactly
 * that size, so a batch's block costs its own size in memory and no copy. */
typedef struct {
    char *data;
    size_t len;
} Buffer;

static void buf_put(Buffer *b, const void *src, size_t n) {
    if (b->data != NULL) memcpy(b->data + b->len, src, n);
    b->len += n;
}

static void buf_leb128(Buffer *b, uint64_t v) {
    uint8_t bytes[10];
    size_t n = 0;
    do {
        uint8_t byte = v & 0x7f;
        v >>= 7;
        bytes[n++] = (uint8_t)(byte | (v ? 0x80 : 0));
    } while (v);
    buf_put(b, bytes, n);
}

static int buf_str(Buffer *b, PyObject *value) {
    if (!PyUnicode_Check(value)) return -1;
    Py_ssize_t n;
    const char *utf8 = PyUnicode_AsUTF8AndSize(value, &n);
    if (utf8 == NULL) return -1;
    buf_leb128(b, (uint64_t)n);
    buf_put(b, utf8, (size_t)n);
    return 0;
}

static void buf_text(Buffer *b, const char *text, Py_ssize_t n) {
    buf_leb128(b, (uint64_t)n);
    buf_put(b, text, (size_t)n);
}

static void buf_int64(Buffer *b, long long v) {
    uint8_t bytes[8];
    for (int i = 0; i < 8; i++) bytes[i] = (uint8_t)((unsigned long long)v >> (8 * i));
    buf_put(b, bytes, 8);
}

/* The column types a block can hold, told apart by the type's name. */
typedef enum { K_STRING, K_UINT8, K_INT64, K_STRING_MAP } ColumnKind;
#define MAX_BLOCK_COLUMNS 32
#define STAMP_TYPE "DateTime64(3, 'UTC')"

typedef struct {
    const char *name, *type;
    Py_ssize_t name_len, type_len;
    ColumnKind kind;
} Column;

static int column_kind(const char *type, ColumnKind *kind) {
    if (strcmp(type, "String") == 0) *kind = K_STRING;
    else if (strcmp(type, "UInt8") == 0) *kind = K_UINT8;
    else if (strcmp(type, "Int64") == 0 || strncmp(type, "DateTime64(3", 12) == 0) *kind = K_INT64;
    else if (strcmp(type, "Map(String, String)") == 0) *kind = K_STRING_MAP;
    else return -1;
    return 0;
}

/* columns: a tuple of (name, type) str pairs; -1 (with an exception set) if it is not one. */
static Py_ssize_t parse_columns(PyObject *spec, Column *columns) {
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 1 || PyTuple_GET_SIZE(spec) > MAX_BLOCK_COLUMNS) {
        PyErr_SetString(PyExc_TypeError, "columns must be a tuple of 1..32 (name, type) pairs");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(spec); i++) {
        PyObject *pair = PyTuple_GET_ITEM(spec, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(pair, 0))
            || !PyUnicode_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "columns must be a tuple of (name, type) str pairs");
            return -1;
        }
        Column *c = &columns[i];
        c->name = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(pair, 0), &c->name_len);
        c->type = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(pair, 1), &c->type_len);
        if (c->name == NULL || c->type == NULL) return -1;
        if (column_kind(c->type, &c->kind) < 0) {
            PyErr_Format(PyExc_ValueError, "no Native encoding here for the column type %s", c->type);
            return -1;
        }
    }
    return PyTuple_GET_SIZE(spec);
}

static int string_column(Buffer *b, PyObject *rows, Py_ssize_t field) {
    Py_ssize_t n = PyList_GET_SIZE(rows);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (buf_str(b, PyTuple_GET_ITEM(PyList_GET_ITEM(rows, i), field))) return -1;
    }
    return 0;
}

static int uint8_column(Buffer *b, PyObject *rows, Py_ssize_t field) {
    Py_ssize_t n = PyList_GET_SIZE(rows);
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PyTuple_GET_ITEM(PyList_GET_ITEM(rows, i), field));
        if ((v == -1 && PyErr_Occurred()) || v < 0 || v > 255) return -1;
        uint8_t byte = (uint8_t)v;
        buf_put(b, &byte, 1);
    }
    return 0;
}

static int int64_column(Buffer *b, PyObject *rows, Py_ssize_t field) {
    Py_ssize_t n = PyList_GET_SIZE(rows);
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(PyTuple_GET_ITEM(PyList_GET_ITEM(rows, i), field));
        if (v == -1 && PyErr_Occurred()) return -1;
        buf_int64(b, v);
    }
    return 0;
}

/* Map(String, String): the rows' running entry counts, then every key, then every value. */
static int string_map_column(Buffer *b, PyObject *rows, Py_ssize_t field) {
    Py_ssize_t n = PyList_GET_SIZE(rows);
    uint64_t offset = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *map = PyTuple_GET_ITEM(PyList_GET_ITEM(rows, i), field);
        if (!PyDict_Check(map)) return -1;
        offset += (uint64_t)PyDict_GET_SIZE(map);
        buf_int64(b, (long long)offset);
    }
    for (int values = 0; values < 2; values++) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *map = PyTuple_GET_ITEM(PyList_GET_ITEM(rows, i), field);
            Py_ssize_t pos = 0;
            PyObject *key, *value;
            while (PyDict_Next(map, &pos, &key, &value)) {
                if (buf_str(b, values ? value : key)) return -1;
            }
        }
    }
    return 0;
}

/* The header and every column the token covers; -1 on anything unexpected (a value of another type). */
static int row_columns(Buffer *b, PyObject *rows, const Column *columns, Py_ssize_t count) {
    buf_leb128(b, (uint64_t)count + 1);
    buf_leb128(b, (uint64_t)PyList_GET_SIZE(rows));
    for (Py_ssize_t i = 0; i < count; i++) {
        const Column *c = &columns[i];
        buf_text(b, c->name, c->name_len);
        buf_text(b, c->type, c->type_len);
        int failed = c->kind == K_STRING ? string_column(b, rows, i)
            : c->kind == K_UINT8 ? uint8_column(b, rows, i)
            : c->kind == K_INT64 ? int64_column(b, rows, i)
            : string_map_column(b, rows, i);
        if (failed) return -1;
    }
    return 0;
}

static void stamp_column(Buffer *b, const char *name, Py_ssize_t name_len, Py_ssize_t rows, long long stamp) {
    buf_text(b, name, name_len);
    buf_text(b, STAMP_TYPE, (Py_ssize_t)strlen(STAMP_TYPE));
    for (Py_ssize_t i = 0; i < rows; i++) buf_int64(b, stamp);
}

/* native_block(rows: list[tuple], columns: tuple[tuple[str, str], ...], stamp_column: str, stamp_ms: int)
 *   -> (bytes, str) | None */
static PyObject *native_block(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyList_CheckExact(args[0]) || !PyUnicode_Check(args[2]) || !PyLong_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "native_block(rows: list, columns: tuple, stamp_column: str, stamp_ms: int)");
        return NULL;
    }
    PyObject *rows = args[0];
    Column columns[MAX_BLOCK_COLUMNS];
    Py_ssize_t count = parse_columns(args[1], columns);
    if (count < 0) return NULL;
    Py_ssize_t stamp_len;
    const char *stamp_name = PyUnicode_AsUTF8AndSize(args[2], &stamp_len);
    if (stamp_name == NULL) return NULL;
    long long stamp = PyLong_AsLongLong(args[3]);
    if (stamp == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(rows);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != count) Py_RETURN_NONE;
    }
    Buffer measure = {NULL, 0};
    if (row_columns(&measure, rows, columns, count) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    size_t covered = measure.len;
    stamp_column(&measure, stamp_name, stamp_len, n, stamp);
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)measure.len);
    if (bytes == NULL) return NULL;
    Buffer b = {PyBytes_AS_STRING(bytes), 0};
    if (row_columns(&b, rows, columns, count) < 0 || b.len != covered) {  /* the same pass over the same rows */
        PyErr_Clear();
        Py_DECREF(bytes);
        Py_RETURN_NONE;
    }
    stamp_column(&b, stamp_name, stamp_len, n, stamp);
    char token[41];
    Py_BEGIN_ALLOW_THREADS  /* megabytes per batch: let the reading thread run meanwhile */
    blake2b_hex((const uint8_t *)b.data, (Py_ssize_t)covered, 20, token);
    Py_END_ALLOW_THREADS
    token[40] = 0;
    return Py_BuildValue("(Ns)", bytes, token);
}

/* configure(FlowEvent, common_timestamp_ms, orjson_loads, orjson_dumps) */
static PyObject *configure(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *type, *common, *loads, *dumps;
    if (!PyArg_ParseTuple(args, "O!OOO", &PyType_Type, &type, &common, &loads, &dumps)) return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "FlowEvent must be a tuple type");
        return NULL;
    }
    Py_XSETREF(flow_event_type, (PyTypeObject *)Py_NewRef(type));
    Py_XSETREF(common_ts_fn, Py_NewRef(common));
    Py_XSETREF(loads_fn, Py_NewRef(loads));
    Py_XSETREF(dumps_fn, Py_NewRef(dumps));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"normalize_pairs", (PyCFunction)(void (*)(void))normalize_pairs, METH_FASTCALL,
     "normalize_pairs(stream, entry_id, pairs, joined, end_types, error_types) -> FlowEvent | None"},
    {"fill_batch", (PyCFunction)(void (*)(void))fill_batch, METH_FASTCALL,
     "fill_batch(stream, items, start, rows_left, bytes_left, events, rejections, ids, fallback, end_types, "
     "error_types) -> (next, rows, bytes, largest)"},
    {"native_block", (PyCFunction)(void (*)(void))native_block, METH_FASTCALL,
     "native_block(rows: list[tuple], columns: tuple[(name, type), ...], stamp_column: str, stamp_ms: int)"
     " -> (Native block, dedup token) | None"},
    {"configure", configure, METH_VARARGS,
     "configure(FlowEvent, common_timestamp_ms, orjson_loads, orjson_dumps)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "worker._fastpath",
                                    "The normalizer's hot path in C (see worker/normalize.py).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastpath(void) {
    s_session_id = PyUnicode_InternFromString("session_id");
    s_node_id = PyUnicode_InternFromString("node_id");
    s_event_type = PyUnicode_InternFromString("event_type");
    s_user_id = PyUnicode_InternFromString("user_id");
    s_parent_id = PyUnicode_InternFromString("parent_id");
    s_timestamp = PyUnicode_InternFromString("timestamp");
    s_event_id = PyUnicode_InternFromString("event_id");
    s_data = PyUnicode_InternFromString("data");
    s_payload = PyUnicode_InternFromString("payload");
    s_empty = PyUnicode_FromString("");
    if (!s_session_id || !s_node_id || !s_event_type || !s_user_id || !s_parent_id || !s_timestamp || !s_event_id
        || !s_data || !s_payload || !s_empty) return NULL;
    name_cache = PyDict_New();
    if (name_cache == NULL) return NULL;
    PyObject *names[7] = {s_session_id, s_node_id, s_event_type, s_user_id, s_parent_id, s_timestamp, s_event_id};
    for (int i = 0; i < 7; i++) {
        reserved[i] = names[i];
        reserved_hash[i] = PyObject_Hash(names[i]);
        if (reserved_hash[i] == -1) return NULL;
    }
    return PyModule_Create(&module);
}
