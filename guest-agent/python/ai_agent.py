"""Python access to the aivmm guest agent through its C ABI (libguest_agent.so).

    import numpy as np
    import ai_agent

    with ai_agent.Agent() as agent:               # the daemon if it runs, else the device
        model = agent.find_model("all-MiniLM-L6-v2")
        text = np.frombuffer(b"A sentence.", dtype=np.uint8)
        result = agent.ai_infer(model, [text]).raise_for_status()
        embedding = result.outputs[0]             # a numpy view of device memory

Tensors live in buffers from ``ai_alloc``: huge-page memory that the device reads and
writes in place. ``Agent.empty`` gives a numpy array in such a buffer: fill it and
pass it to ``ai_infer`` and no byte is copied on the way in. Any other array is copied
once into a new buffer. Outputs come back as numpy arrays over their output buffers
(no copy); they stay valid while referenced, and until the agent is closed.

numpy has no bfloat16: BF16 tensors are given and returned as uint16 bit patterns.
The library is found through ``library=``, else ``$AI_AGENT_LIBRARY``, else the
system's search path (``libguest_agent.so``).
"""

import ctypes
import os
import weakref

try:
    import numpy as np
except ImportError:  # pragma: no cover - the module needs numpy for tensors only
    np = None

MAX_TENSORS = 16
MAX_RANK = 8
MAX_MODEL_NAME_LEN = 64
MAX_TENSOR_NAME_LEN = 32
STATUS_SLOTS = 16
LATENCY_BUCKETS = 32

OK = 0
E_TOO_SMALL = -5

MODES = {"auto": 0, "direct": 1, "daemon": 2}
PRIORITIES = {"batch": 0, "normal": 1, "standard": 1, "interactive": 2, "realtime": 3}
STATUS_OK = 0
STATUS_BUFFER_TOO_SMALL = 6

# AI_DTYPE_* -> (name, numpy dtype name).
DTYPES = {
    1: ("f32", "float32"),
    2: ("f16", "float16"),
    3: ("bf16", "uint16"),
    4: ("f64", "float64"),
    5: ("i8", "int8"),
    6: ("u8", "uint8"),
    7: ("i16", "int16"),
    8: ("i32", "int32"),
    9: ("i64", "int64"),
    10: ("u32", "uint32"),
    11: ("bool", "bool"),
}


class TensorDesc(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_uint8),
        ("rank", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 6),
        ("dims", ctypes.c_uint64 * MAX_RANK),
        ("data_len", ctypes.c_uint64),
    ]


class Input(ctypes.Structure):
    _fields_ = [("desc", TensorDesc), ("buffer", ctypes.c_void_p)]


class Output(ctypes.Structure):
    _fields_ = [("desc", TensorDesc), ("buffer", ctypes.c_void_p)]


class InferOptions(ctypes.Structure):
    _fields_ = [
        ("priority", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 7),
        ("deadline_us", ctypes.c_uint64),
        ("request_id", ctypes.c_uint64),
    ]


class InferResult(ctypes.Structure):
    _fields_ = [
        ("status", ctypes.c_uint32),
        ("detail", ctypes.c_uint32),
        ("request_id", ctypes.c_uint64),
        ("queue_ns", ctypes.c_uint64),
        ("compute_ns", ctypes.c_uint64),
        ("payload_len", ctypes.c_uint64),
        ("batch_size", ctypes.c_uint32),
        ("num_outputs", ctypes.c_uint32),
        ("outputs", TensorDesc * MAX_TENSORS),
    ]


class TensorSpecC(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_uint8),
        ("rank", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 2),
        ("name", ctypes.c_char * (MAX_TENSOR_NAME_LEN + 1)),
        ("dims_min", ctypes.c_uint64 * MAX_RANK),
        ("dims_max", ctypes.c_uint64 * MAX_RANK),
    ]


class ModelInfoC(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("max_batch", ctypes.c_uint32),
        ("num_inputs", ctypes.c_uint32),
        ("num_outputs", ctypes.c_uint32),
        ("name", ctypes.c_char * (MAX_MODEL_NAME_LEN + 1)),
        ("inputs", TensorSpecC * MAX_TENSORS),
        ("outputs", TensorSpecC * MAX_TENSORS),
    ]


class OpenOptions(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_uint32),
        ("session_mb", ctypes.c_uint32),
        ("pool_mb", ctypes.c_uint32),
        ("connect_timeout_s", ctypes.c_uint32),
        ("socket", ctypes.c_char_p),
        ("bdf", ctypes.c_char_p),
    ]


class AgentError(Exception):
    """A call of the C ABI failed (``code`` is its AI_E_* value)."""

    def __init__(self, code, message):
        super().__init__(f"{message} (code {code})")
        self.code = code


class StatusError(Exception):
    """The device completed a request with a status other than OK."""

    def __init__(self, result):
        super().__init__(f"device status {result.status_name} (detail {result.detail})")
        self.result = result


def _load(library):
    path = library or os.environ.get("AI_AGENT_LIBRARY") or "libguest_agent.so"
    lib = ctypes.CDLL(path)
    vp, i32 = ctypes.c_void_p, ctypes.c_int
    sigs = {
        "ai_open": (i32, [ctypes.POINTER(OpenOptions), ctypes.POINTER(vp)]),
        "ai_close": (None, [vp]),
        "ai_alloc": (i32, [vp, ctypes.c_size_t, ctypes.c_uint32, ctypes.POINTER(vp)]),
        "ai_free": (i32, [vp, vp]),
        "ai_buffer_data": (ctypes.c_void_p, [vp, vp]),
        "ai_buffer_len": (ctypes.c_size_t, [vp, vp]),
        "ai_infer": (
            i32,
            [
                vp,
                ctypes.c_uint32,
                ctypes.POINTER(Input),
                ctypes.c_size_t,
                ctypes.POINTER(Output),
                ctypes.c_size_t,
                ctypes.POINTER(InferOptions),
                ctypes.POINTER(InferResult),
            ],
        ),
        "ai_models": (i32, [vp, ctypes.POINTER(ModelInfoC), ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
        "ai_last_error": (ctypes.c_char_p, []),
        "ai_status_name": (ctypes.c_char_p, [ctypes.c_uint32]),
    }
    for name, (restype, argtypes) in sigs.items():
        f = getattr(lib, name)
        f.restype = restype
        f.argtypes = argtypes
    return lib


def _numpy():
    if np is None:
        raise ImportError("numpy is needed for tensors (pip install numpy)")
    return np


class TensorSpec:
    """One tensor of a model's signature: name, dtype (``f32``...), dims as (min, max)."""

    def __init__(self, c):
        self.name = c.name.decode()
        self.dtype_code = c.dtype
        self.dtype = DTYPES.get(c.dtype, ("?", None))[0]
        self.dims = [(c.dims_min[i], c.dims_max[i]) for i in range(c.rank)]

    def __repr__(self):
        return f"TensorSpec({self.name!r}, {self.dtype}, {self.dims})"


class Model:
    """A model the device offers: id, name, max_batch, inputs and outputs."""

    def __init__(self, c):
        self.id = c.id
        self.name = c.name.decode()
        self.max_batch = c.max_batch
        self.inputs = [TensorSpec(c.inputs[i]) for i in range(c.num_inputs)]
        self.outputs = [TensorSpec(c.outputs[i]) for i in range(c.num_outputs)]

    def __repr__(self):
        return f"Model({self.id}, {self.name!r}, inputs={self.inputs}, outputs={self.outputs})"


class Buffer:
    """Tensor memory from ``ai_alloc``; freed when garbage collected (or ``free()``)."""

    def __init__(self, agent, handle):
        self._agent = agent
        self._handle = handle
        self.address = agent._lib.ai_buffer_data(agent._handle, handle)
        self.size = agent._lib.ai_buffer_len(agent._handle, handle)

    def __len__(self):
        return self.size

    def array(self, dtype, shape, count=None):
        """A numpy view of the buffer's start (no copy), as ``dtype`` with ``shape``."""
        npm = _numpy()
        dtype = npm.dtype(dtype)
        n = int(npm.prod(shape, dtype=npm.uint64)) if count is None else count
        nbytes = n * dtype.itemsize
        if nbytes > self.size:
            raise ValueError(f"{nbytes} bytes do not fit in a buffer of {self.size}")
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(self.address)
        raw._ai_buffer = self  # the view keeps the buffer alive
        return npm.frombuffer(raw, dtype=dtype, count=n).reshape(shape)

    def bytes(self, n=None):
        """A copy of the first ``n`` bytes."""
        return ctypes.string_at(self.address, self.size if n is None else n)

    def free(self):
        """Frees the buffer now (views of it must not be used after this)."""
        if self._handle is not None and self._agent._handle is not None:
            self._agent._lib.ai_free(self._agent._handle, self._handle)
        self._handle = None

    def __del__(self):
        try:
            self.free()
        except Exception:  # interpreter shutdown
            pass


class Result:
    """What ``ai_infer`` gives: the device status, timings and output arrays."""

    def __init__(self, agent, c, outputs):
        self.status = c.status
        self.status_name = agent._lib.ai_status_name(c.status).decode()
        self.detail = c.detail
        self.request_id = c.request_id
        self.queue_ns = c.queue_ns
        self.compute_ns = c.compute_ns
        self.batch_size = c.batch_size
        self.payload_len = c.payload_len
        self.shapes = [
            (c.outputs[k].dtype, [c.outputs[k].dims[i] for i in range(c.outputs[k].rank)], c.outputs[k].data_len)
            for k in range(c.num_outputs)
        ]
        self.outputs = outputs

    @property
    def ok(self):
        return self.status == STATUS_OK

    def raise_for_status(self):
        """Returns self if the status is OK, else raises StatusError."""
        if not self.ok:
            raise StatusError(self)
        return self


def _dtype_code(dtype):
    npm = _numpy()
    dtype = npm.dtype(dtype)
    for code, (_, name) in DTYPES.items():
        if code != 3 and npm.dtype(name) == dtype:
            return code
    raise ValueError(f"numpy dtype {dtype} has no ai_infer dtype")


def _desc(code, dims, data_len):
    if len(dims) > MAX_RANK:
        raise ValueError(f"rank {len(dims)} is over {MAX_RANK}")
    d = TensorDesc()
    d.dtype = code
    d.rank = len(dims)
    for i, v in enumerate(dims):
        d.dims[i] = int(v)
    d.data_len = int(data_len)
    return d


class Agent:
    """The agent: the daemon or the device itself (``mode``: auto, direct, daemon)."""

    def __init__(self, mode="auto", socket=None, session_mb=0, pool_mb=0, connect_timeout_s=0, bdf=None, library=None):
        self._lib = _load(library)
        self._handle = None
        self._buffers = weakref.WeakValueDictionary()  # address -> Buffer
        self.copies = 0  # inputs copied into device memory (0 when given as agent arrays)
        self._models = []  # the last MODELS answer, for find_model
        opts = OpenOptions()
        opts.mode = MODES[mode]
        opts.session_mb = session_mb
        opts.pool_mb = pool_mb
        opts.connect_timeout_s = connect_timeout_s
        opts.socket = socket.encode() if socket else None
        opts.bdf = bdf.encode() if bdf else None
        handle = ctypes.c_void_p()
        self._check(self._lib.ai_open(ctypes.byref(opts), ctypes.byref(handle)))
        self._handle = handle

    def _check(self, code):
        if code != OK:
            raise AgentError(code, self._lib.ai_last_error().decode(errors="replace"))

    def close(self):
        """Closes the agent; its buffers and the arrays over them become invalid."""
        if self._handle is not None:
            self._lib.ai_close(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def ai_alloc(self, size, zero=False):
        """``size`` bytes of device-addressable memory."""
        out = ctypes.c_void_p()
        self._check(self._lib.ai_alloc(self._handle, max(int(size), 1), 1 if zero else 0, ctypes.byref(out)))
        buf = Buffer(self, out)
        self._buffers[buf.address] = buf
        return buf

    def empty(self, shape, dtype):
        """A new numpy array in device memory: inputs given this way are not copied."""
        npm = _numpy()
        dtype = npm.dtype(dtype)
        n = int(npm.prod(shape, dtype=npm.uint64))
        return self.ai_alloc(max(n * dtype.itemsize, 1)).array(dtype, shape)

    def ai_models(self):
        """The models this tenant may use."""
        count = ctypes.c_size_t(0)
        code = self._lib.ai_models(self._handle, None, 0, ctypes.byref(count))
        if code not in (OK, E_TOO_SMALL):
            self._check(code)
        while True:
            cap = count.value
            arr = (ModelInfoC * max(cap, 1))()
            code = self._lib.ai_models(self._handle, arr, cap, ctypes.byref(count))
            if code == E_TOO_SMALL:
                continue  # the list grew in between
            self._check(code)
            self._models = [Model(arr[i]) for i in range(count.value)]
            return list(self._models)

    def find_model(self, name_or_id):
        """The model with this name (or id); asks the device when it is not known yet."""
        for models in (self._models, None):
            for m in models if models is not None else self.ai_models():
                if m.name == name_or_id or str(m.id) == str(name_or_id):
                    return m
        raise KeyError(f"no model {name_or_id!r}")

    def _buffer_of(self, array):
        """The agent buffer ``array`` starts at, if it is a C-contiguous agent array."""
        if not array.flags.c_contiguous:
            return None
        buf = self._buffers.get(array.__array_interface__["data"][0])
        if buf is not None and array.nbytes <= buf.size:
            return buf
        return None

    def _input(self, array):
        npm = _numpy()
        array = npm.asarray(array)
        buf = self._buffer_of(array)
        if buf is None:
            buf = self.ai_alloc(array.nbytes)
            buf.array(array.dtype, array.shape)[...] = array
            self.copies += 1
        return _desc(_dtype_code(array.dtype), array.shape, array.nbytes), buf

    def _output_for(self, spec, cap):
        code = spec.dtype_code
        item = _numpy().dtype(DTYPES[code][1]).itemsize
        dims = [lo if lo == hi else 0 for lo, hi in spec.dims]
        largest = item
        for _, hi in spec.dims:
            largest *= hi
        size = max(min(largest, cap), 1)
        return _desc(code, dims, size), self.ai_alloc(size)

    def ai_infer(self, model, inputs, outputs=None, priority="normal", deadline_us=0, request_id=0, output_cap=16 << 20):
        """Runs ``model`` (a Model or its id) on ``inputs`` (numpy arrays).

        ``outputs``: None to size buffers from the signature (at most ``output_cap``
        bytes each, resized once if the device asks for more), or a list of Buffers.
        The result's ``outputs`` are numpy views of the output buffers with the
        produced shapes (for an OK status). A device status other than OK is in
        ``result.status``; ``raise_for_status()`` turns it into an exception.
        """
        npm = _numpy()
        m = model if isinstance(model, Model) else self.find_model(model)
        ins = [self._input(a) for a in inputs]
        if outputs is None:
            outs = [self._output_for(s, output_cap) for s in m.outputs]
        else:
            outs = []
            for spec, buf in zip(m.outputs, outputs):
                dims = [lo if lo == hi else 0 for lo, hi in spec.dims]
                outs.append((_desc(spec.dtype_code, dims, len(buf)), buf))
        opts = InferOptions()
        opts.priority = PRIORITIES[priority] if isinstance(priority, str) else int(priority)
        opts.deadline_us = deadline_us
        opts.request_id = request_id
        for attempt in range(2):
            c_in = (Input * max(len(ins), 1))()
            for i, (d, b) in enumerate(ins):
                c_in[i].desc = d
                c_in[i].buffer = b._handle
            c_out = (Output * max(len(outs), 1))()
            for k, (d, b) in enumerate(outs):
                c_out[k].desc = d
                c_out[k].buffer = b._handle
            res = InferResult()
            self._check(self._lib.ai_infer(self._handle, m.id, c_in, len(ins), c_out, len(outs), ctypes.byref(opts), ctypes.byref(res)))
            if res.status == STATUS_BUFFER_TOO_SMALL and outputs is None and attempt == 0 and res.num_outputs == len(outs):
                grown = []
                for k, (d, b) in enumerate(outs):
                    need = res.outputs[k].data_len
                    if need > d.data_len:
                        d = _desc(d.dtype, [d.dims[i] for i in range(d.rank)], need)
                        b = self.ai_alloc(need)
                    grown.append((d, b))
                outs = grown
                continue
            break
        arrays = []
        if res.status == STATUS_OK:
            for k in range(res.num_outputs):
                o = res.outputs[k]
                shape = tuple(o.dims[i] for i in range(o.rank))
                dtype = npm.dtype(DTYPES[o.dtype][1])
                arrays.append(outs[k][1].array(dtype, shape, count=o.data_len // dtype.itemsize))
        return Result(self, res, arrays)
