/* The normalizer's hot path in C: one Redis stream entry, as the flat [name, value, ...] list hiredis returns,
 * to a FlowEvent, or None for anything it does not handle, which the Python normalizer (worker/normalize.py) then
 * decides as before. It computes exactly what Normalizer._build_fast computes and returns an event only where that
 * would, so both give the same events (tests/test_normalize_shapes.py runs them side by side); every rejection is
 * the Python path's. Optional: built when a C compiler is present (hatch_build.py), else the Python path alone runs.
 *
 * What stays in Python, called from here: the envelope's JSON (normalize._unwrap, orjson), timestamps that are not
 * plain epoch digits (normalize._common_timestamp_ms), the content digest of derived ids (normalize.content_digest)
 * and JSON text of non-string attribute values (orjson.dumps). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define MAX_ID_CHARS 256
#define MAX_EVENT_TYPE_CHARS 128
#define MAX_ATTRIBUTES 256
#define MAX_ENTRY_BYTES (1 << 20)
#define SECONDS_MS_BOUNDARY 100000000000LL
#define MAX_TS_MS 7258118400000LL
#define FLOW_EVENT_FIELDS 12

/* Set once by configure(): the FlowEvent type and the Python helpers named above. */
static PyTypeObject *flow_event_type = NULL;
static PyObject *unwrap_fn = NULL;
static PyObject *common_ts_fn = NULL;
static PyObject *digest_fn = NULL;
static PyObject *dumps_fn = NULL;

static PyObject *s_session_id, *s_node_id, *s_event_type, *s_user_id, *s_parent_id, *s_timestamp, *s_event_id,
    *s_data, *s_payload, *s_empty;

static int is_reserved(PyObject *key) {
    /* Interned names compare by pointer first; a key built from the entry is compared by value. */
    PyObject *names[7] = {s_session_id, s_node_id, s_event_type, s_user_id, s_parent_id, s_timestamp, s_event_id};
    Py_ssize_t len = PyUnicode_GET_LENGTH(key);
    for (int i = 0; i < 7; i++) {
        if (key == names[i]) return 1;
    }
    for (int i = 0; i < 7; i++) {
        if (len == PyUnicode_GET_LENGTH(names[i]) && PyUnicode_Compare(key, names[i]) == 0) return 1;
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

/* {name: value} of the entry's pairs, decoded as strict UTF-8; NULL without an error set when a part is not. */
static PyObject *decode_pairs(PyObject *pairs) {
    Py_ssize_t n = PyList_GET_SIZE(pairs);
    PyObject *record = PyDict_New();
    if (record == NULL) return NULL;
    for (Py_ssize_t i = 0; i + 1 < n; i += 2) {
        PyObject *k = PyList_GET_ITEM(pairs, i), *v = PyList_GET_ITEM(pairs, i + 1);
        if (!PyBytes_CheckExact(k) || !PyBytes_CheckExact(v)) goto unusual;
        PyObject *key = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k), NULL);
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
    return record;
unusual:
    PyErr_Clear();
    Py_DECREF(record);
    return NULL;
}

/* The envelope shape merged into the flat fields, as normalize._unwrap; NULL (no error) if it rejects. */
static PyObject *unwrap(PyObject *record) {
    if (PyDict_Contains(record, s_session_id) == 1) return record;
    if (PyDict_Contains(record, s_data) != 1 && PyDict_Contains(record, s_payload) != 1) return record;
    PyObject *merged = PyObject_CallOneArg(unwrap_fn, record);
    Py_DECREF(record);
    if (merged == NULL || !PyDict_CheckExact(merged)) {
        PyErr_Clear();
        Py_XDECREF(merged);
        return NULL;
    }
    return merged;
}

/* The event's ts in ms as a Python int, or NULL (no error) to leave the entry to the Python path. */
static PyObject *timestamp_ms(PyObject *stamp, PyObject *entry_id) {
    long long ms;
    if (absent(stamp)) {
        ms = entry_id_ms(entry_id);
        if (ms < 0) return NULL;
        return PyLong_FromLongLong(ms);
    }
    if (PyUnicode_CheckExact(stamp)) {
        ms = ascii_digits(stamp, 0, PyUnicode_GET_LENGTH(stamp), 16);
        if (ms >= 0) {
            if (ms < SECONDS_MS_BOUNDARY) ms *= 1000;
            if (ms >= MAX_TS_MS) return NULL;
            return PyLong_FromLongLong(ms);
        }
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
    PyObject *digest = PyObject_CallOneArg(digest_fn, joined);
    if (digest == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *id = PyUnicode_FromFormat("%U/%U/%U", stream, entry_id, digest);
    Py_DECREF(digest);
    if (id == NULL) PyErr_Clear();
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
static PyObject *normalize_pairs(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

/* configure(FlowEvent, unwrap, common_timestamp_ms, content_digest, orjson_dumps) */
static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *type, *unwrap, *common, *digest, *dumps;
    if (!PyArg_ParseTuple(args, "O!OOOO", &PyType_Type, &type, &unwrap, &common, &digest, &dumps)) return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "FlowEvent must be a tuple type");
        return NULL;
    }
    Py_XSETREF(flow_event_type, (PyTypeObject *)Py_NewRef(type));
    Py_XSETREF(unwrap_fn, Py_NewRef(unwrap));
    Py_XSETREF(common_ts_fn, Py_NewRef(common));
    Py_XSETREF(digest_fn, Py_NewRef(digest));
    Py_XSETREF(dumps_fn, Py_NewRef(dumps));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"normalize_pairs", (PyCFunction)(void (*)(void))normalize_pairs, METH_FASTCALL,
     "normalize_pairs(stream, entry_id, pairs, joined, end_types, error_types) -> FlowEvent | None"},
    {"configure", configure, METH_VARARGS,
     "configure(FlowEvent, unwrap, common_timestamp_ms, content_digest, orjson_dumps)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "worker._fastpath",
                                    "The normalizer's hot path in C (see worker/normalize.py).", -1, methods};

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
    return PyModule_Create(&module);
}
