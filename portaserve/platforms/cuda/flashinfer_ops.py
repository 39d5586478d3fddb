"""FlashInfer attention (https://github.com/flashinfer-ai/flashinfer) behind portaserve's
attention ops, on NVIDIA GPUs where ``flashinfer`` imports (``pip install portaserve[cuda]``;
it compiles its kernels with nvcc on first use and caches them).

FlashInfer splits a batch's attention into *plan* (on the host: the work partition, from
the sequence lengths; once per forward) and *run* (one launch per layer).  portaserve's
ops are one call per layer with device tensors, so:

* ``attention_prepare(fb)``, called before each forward, plans the forward's batch from
  its host-side lengths (``fb.seq_lens_cpu`` / ``fb.extend_lens_cpu``) without reading the
  device; each layer's call then finds that plan by the address of its ``req_pool_indices``
  and ``seq_lens`` (the batch's own tensors, or the head and tail views of a mixed batch)
  and only runs.
* A call no plan matches (the op used on its own: tests, benches) plans itself from the
  device tensors: the same result, one device sync.

A plan holds references to the tensors it was made for, so no other batch's tensor can
take their addresses while it is live.  A caller that rewrites those tensors in place
(the CUDA graph runner's static buffers) calls ``attention_prepare`` again first.

KV layout: the pool ``[slots, Hk, D]`` is FlashInfer's paged NHD layout with page size 1,
and a request's page list is its ``req_to_token`` row (gathered on the device).
CUDA graphs: per captured batch size a decode wrapper in graph mode over fixed buffers;
``attention_prepare(fb, graph=True)`` re-plans into them before each replay.
float32 queries, an FP8 KV cache and head sizes FlashInfer has no kernel for go to the
project's Triton kernels.
"""
from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict

import torch

_WORKSPACE_BYTES = 256 << 20  # float workspace for split-KV partial results (SGLang uses 256 MB)
_HEAD_DIMS = (64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16)
_MAX_PLANS = 8


def _flashinfer():
    import flashinfer  # lazy: only where the provider was chosen

    return flashinfer


def _triton():
    from portaserve.platforms.triton_kernels import attention

    return attention


def supported(q_dtype, kv_dtype, head_dim: int) -> bool:
    return q_dtype in _DTYPES and kv_dtype == q_dtype and head_dim in _HEAD_DIMS


def unsupported_reason(model: dict) -> str | None:
    """The registry's model check: None when FlashInfer has kernels for this model and,
    when the model's per-rank head counts are given (an engine starting, not
    ``portaserve env``), they build and agree with the native ops on this GPU."""
    dt, kv, hd = model.get("dtype"), model.get("kv_dtype"), model.get("head_dim")
    if dt not in _DTYPES:
        return f"no FlashInfer kernels for {dt} (float16 and bfloat16 only)"
    if kv != dt:
        return f"KV cache dtype {kv} differs from the model's {dt} (not wired to FlashInfer)"
    if hd not in _HEAD_DIMS:
        return f"head size {hd} (FlashInfer: {', '.join(map(str, _HEAD_DIMS))})"
    if model.get("heads") and model.get("kv_heads"):
        return selftest(dt, model["heads"], model["kv_heads"], hd)
    return None


_SELFTEST: dict = {}


def selftest(dtype=torch.bfloat16, heads: int = 8, kv_heads: int = 2, head_dim: int = 128) -> str | None:
    """Build FlashInfer's kernels for this attention shape on the GPU (nvcc, on first use;
    cached in ~/.cache/flashinfer after) and compare a decode and an extend with the
    native ops: None when they agree, else the reason (the registry then picks Triton and
    says why).  Once per device, shape and process."""
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda", torch.cuda.current_device())  # the rank's: bound before resolution
    key = (str(dev), dtype, heads, kv_heads, head_dim)
    if key not in _SELFTEST:
        try:
            import flashinfer  # noqa: F401  (not installed: say so, not a failed comparison)

            _SELFTEST[key] = _compare_with_native(dev, dtype, heads, kv_heads, head_dim)
        except Exception as e:  # no nvcc, an unsupported GPU, a broken install
            _SELFTEST[key] = f"FlashInfer failed on {dev}: {type(e).__name__}: {str(e)[:300]}"
        finally:
            torch.cuda.empty_cache()  # its workspace is not the KV pool's to lose
    return _SELFTEST[key]


def _compare_with_native(dev, dt, H, Hk, D) -> str | None:
    from portaserve.core.ops import native

    g = torch.Generator().manual_seed(0)
    S, W = 512, 128
    k = torch.randn(S, Hk, D, generator=g).to(dev, dt)
    v = torch.randn(S, Hk, D, generator=g).to(dev, dt)
    r2t = torch.randperm(S - 1, generator=g)[:3 * W].add(1).view(3, W).to(dev, torch.int32)
    rpi = torch.tensor([2, 0, 1], device=dev)
    seq = torch.tensor([1, 77, 128], device=dev)
    ext = torch.tensor([1, 30, 128], device=dev)
    scale = D ** -0.5
    for name, args in (("decode", (torch.randn(3, H, D, generator=g).to(dev, dt), k, v, r2t, rpi, seq, scale)),
                       ("extend", (torch.randn(int(ext.sum()), H, D, generator=g).to(dev, dt), k, v, r2t, rpi,
                                   seq - ext, ext, scale))):
        ref = getattr(native, f"attention_{name}")(*args).float()
        got = globals()[f"attention_{name}"](*args).float()
        err = (got - ref).abs().max().item()
        if not err < 2e-2:
            return f"FlashInfer {name} differs from native by {err:.3g} on {dev} ({dt}, {H}/{Hk} heads x {D})"
    return None


class _Config:
    """The layers' attention shape, learned from the first call (the same for every layer)."""

    def __init__(self, q, k_cache, scale):
        self.heads, self.head_dim = q.shape[1], q.shape[2]
        self.kv_heads = k_cache.shape[1]
        self.q_dtype, self.kv_dtype = q.dtype, k_cache.dtype
        self.scale = scale
        self.ok = supported(q.dtype, k_cache.dtype, self.head_dim) and k_cache.shape[2] == self.head_dim

    def matches(self, q, k_cache, scale) -> bool:
        return (q.shape[1] == self.heads and q.shape[2] == self.head_dim and k_cache.shape[1] == self.kv_heads
                and q.dtype == self.q_dtype and k_cache.dtype == self.kv_dtype and scale == self.scale)


class _Pending:
    """The batch attention_prepare saw before the layers' shape was known, planned at its
    first layer.  Without its KV pool and request table: a forward that never reaches
    FlashInfer must not keep them alive (the state has the table)."""

    def __init__(self, fb, graph):
        self.fb, self.graph = dataclasses.replace(fb, kv=None, req_to_token=None), graph


def _key(rpi: torch.Tensor, lens: torch.Tensor, kind: str, prefix_lens=None) -> tuple:
    # decode: (rows, seq_lens); extend: (rows, extend_lens, prefix_lens), what the calls pass
    return kind, rpi.data_ptr(), rpi.numel(), lens.data_ptr(), None if prefix_lens is None else prefix_lens.data_ptr()


class _State:
    """Per request table (one per engine): the workspace, the wrappers and their live
    plans.  Wrappers are made and planned under inference mode, always: a buffer
    FlashInfer allocates there is an inference tensor, which a later plan outside
    inference mode could not update."""

    def __init__(self, device, table=lambda: None):
        self.device = device
        self.table = table  # a weak reference to the engine's request table
        with torch.inference_mode():
            self.workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.config: _Config | None = None
        self.pending: _Pending | None = None
        self.plans: OrderedDict = OrderedDict()  # key -> (wrapper, refs)
        self._eager = {}  # kind -> wrapper
        self._graph = {}  # batch size -> (decode wrapper in graph mode, its index room)
        self._graph_bufs = None  # (indptr, indices, last_page_len), shared by the graph wrappers
        self._copied = {}  # id(wrapper) -> event after its last plan's host-to-device copy

    # ---- wrappers ---------------------------------------------------------------------
    def _tensor_cores(self) -> bool:
        # FlashInfer's advice: the tensor-core (prefill) kernel for decode once a KV head
        # serves 4 or more query heads
        return self.config.heads // self.config.kv_heads >= 4

    @torch.inference_mode()
    def eager_wrapper(self, kind: str):
        w = self._eager.get(kind)
        if w is None:
            fi = _flashinfer()
            if kind == "extend":
                w = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
            else:
                w = fi.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                          use_tensor_cores=self._tensor_cores())
            self._eager[kind] = w
        return w

    @torch.inference_mode()
    def graph_wrapper(self, bs: int, max_indices: int):
        w, room = self._graph.get(bs, (None, 0))
        if room < max_indices:  # new, or rows grew (not within one engine: its table's width is fixed)
            w = None
        if w is None:
            bufs = self._graph_bufs
            if bufs is None or bufs[0].numel() < bs + 1 or bufs[1].numel() < max_indices:
                n = max(bs + 1, bufs[0].numel() if bufs else 0)
                m = max(max_indices, bufs[1].numel() if bufs else 0)
                bufs = (torch.zeros(n, dtype=torch.int32, device=self.device),
                        torch.zeros(m, dtype=torch.int32, device=self.device),
                        torch.ones(n, dtype=torch.int32, device=self.device))
                self._graph_bufs = bufs
            w = _flashinfer().BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self._tensor_cores(),
                paged_kv_indptr_buffer=bufs[0][:bs + 1], paged_kv_indices_buffer=bufs[1],
                paged_kv_last_page_len_buffer=bufs[2][:bs])
            self._graph[bs] = (w, bufs[1].numel())
        return w

    # ---- planning -----------------------------------------------------------------------
    # A plan fills the wrapper's page-locked host buffer and copies it to the device
    # asynchronously.  The overlap scheduler plans batch N+1 while the device may still be
    # behind; before refilling that buffer, wait until the last plan's copy has run (in
    # practice long done: the device is running N by then).
    def _before_plan(self, wrapper) -> None:
        ev = self._copied.get(id(wrapper))
        if ev is not None:
            ev.synchronize()

    def _after_plan(self, wrapper) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
            self._copied[id(wrapper)] = ev

    def _forget(self, wrapper) -> None:
        # a wrapper holds one plan: planning it again invalidates the old entry
        for k in [k for k, (w, _) in self.plans.items() if w is wrapper]:
            del self.plans[k]

    def _remember(self, key, wrapper, refs) -> None:
        self._forget(wrapper)
        self.plans[key] = (wrapper, refs)
        while len(self.plans) > _MAX_PLANS:
            self.plans.popitem(last=False)

    @torch.inference_mode()
    def plan_decode(self, req_to_token, rpi, seq_lens, seq_host, graph: bool):
        c = self.config
        bs = rpi.numel()
        indptr, indices = _page_lists(req_to_token, rpi, seq_lens, seq_host)
        if graph:
            wrapper = self.graph_wrapper(bs, req_to_token.shape[1] * bs)
        else:
            wrapper = self.eager_wrapper("decode")
        self._before_plan(wrapper)
        wrapper.plan(indptr, indices, torch.ones(bs, dtype=torch.int32), c.heads, c.kv_heads, c.head_dim, 1,
                     q_data_type=c.q_dtype, kv_data_type=c.kv_dtype, sm_scale=c.scale)
        self._after_plan(wrapper)
        self._remember(_key(rpi, seq_lens, "decode"), wrapper, (rpi, seq_lens))
        return wrapper

    @torch.inference_mode()
    def plan_extend(self, req_to_token, rpi, seq_lens, seq_host, prefix_lens, extend_lens, ext_host, refs):
        """Plan an extend; keyed by (rpi, extend_lens, prefix_lens): the extend calls pass those."""
        c = self.config
        bs = rpi.numel()
        kv_indptr, indices = _page_lists(req_to_token, rpi, seq_lens, seq_host)
        qo_indptr = torch.zeros(bs + 1, dtype=torch.int32)
        torch.cumsum(ext_host.to(torch.int32), 0, out=qo_indptr[1:])
        wrapper = self.eager_wrapper("extend")
        self._before_plan(wrapper)
        wrapper.plan(qo_indptr, kv_indptr, indices, torch.ones(bs, dtype=torch.int32), c.heads, c.kv_heads,
                     c.head_dim, 1, causal=True, sm_scale=c.scale, q_data_type=c.q_dtype,
                     kv_data_type=c.kv_dtype)
        self._after_plan(wrapper)
        self._remember(_key(rpi, extend_lens, "extend", prefix_lens), wrapper, refs)
        return wrapper

    def prepare(self, fb, graph: bool) -> None:
        """Plan fb's attention now if the layers' shape is known, else at its first layer."""
        if fb.shared is not None:  # cascade steps run attention_decode_shared (Triton)
            return
        if self.config is None:
            self.pending = _Pending(fb, graph)
            return
        self.pending = None
        if not self.config.ok:
            return
        self._plan_from(fb, graph)

    def _plan_from(self, fb, graph: bool) -> None:
        kinds = _routed_here()
        if not kinds or (fb.is_decode and "decode" not in kinds):
            return
        r2t = self.table()
        seq_host = fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens.to("cpu", torch.int32)
        if fb.is_decode:
            self.plan_decode(r2t, fb.req_pool_indices, fb.seq_lens, seq_host, graph)
            return
        ext_host = fb.extend_lens_cpu if fb.extend_lens_cpu is not None else fb.extend_lens.to("cpu", torch.int32)
        n = fb.decode_tail
        rpi, sl, pl, el = fb.req_pool_indices, fb.seq_lens, fb.prefix_lens, fb.extend_lens
        refs = (rpi, sl, pl, el)
        if n:  # the layers call extend on the head and decode on the tail (models/layers.py)
            if "extend" in kinds:
                self.plan_extend(r2t, rpi[:-n], sl[:-n], seq_host[:-n], pl[:-n], el[:-n],
                                 ext_host[:-n], refs)
            if "decode" in kinds:
                self.plan_decode(r2t, rpi[-n:], sl[-n:], seq_host[-n:], False)
        elif "extend" in kinds:
            self.plan_extend(r2t, rpi, sl, seq_host, pl, el, ext_host, refs)

    def accepts(self, q, k_cache, scale) -> bool:
        """True when FlashInfer runs this call.  The layers' shape is learned from the first
        call and re-learned when another model's calls come (tests run several engines in
        one process), unless graphs were captured with it: then other shapes use Triton."""
        c = self.config
        if c is None or (not c.matches(q, k_cache, scale) and not self._graph):
            self.plans.clear()
            self._eager.clear()
            self.config = c = _Config(q, k_cache, scale)
        return c.ok and c.matches(q, k_cache, scale)

    def find(self, kind, rpi, lens, prefix_lens=None):
        """The wrapper planned for this call (lens: seq_lens for decode, extend_lens for
        extend), planning the pending forward first if need be; None when none matches."""
        key = _key(rpi, lens, kind, prefix_lens)
        hit = self.plans.get(key)
        if hit is None and self.pending is not None:  # the first forward: plan it now
            p, self.pending = self.pending, None
            self._plan_from(p.fb, p.graph)
            hit = self.plans.get(key)
        return None if hit is None else hit[0]


# id(req_to_token) -> _State: each engine (its request table) has its own wrappers, so one
# engine's captured graphs never see another's plans; dropped when the table is freed
_STATES: dict = {}


def _routed_here() -> set:
    """Which of decode/extend the op table sends to FlashInfer (both when no table is in
    use): attention_prepare plans only those (on CUDA decode defaults to Triton)."""
    from portaserve.core import ops

    table = ops.current_table()
    if table is None:
        return {"decode", "extend"}
    return {k for k in ("decode", "extend")
            if getattr(table.choices.get(f"attention_{k}"), "provider", None) == "flashinfer"}


def _state(req_to_token) -> _State:
    key = id(req_to_token)
    st = _STATES.get(key)
    if st is None or st.table() is not req_to_token:
        st = _STATES[key] = _State(req_to_token.device, weakref.ref(req_to_token))
        weakref.finalize(req_to_token, _STATES.pop, key, None)
    return st


def _page_lists(req_to_token, rpi, seq_lens, seq_host):
    """FlashInfer's page lists for page size 1: indptr (host, int32, cumulative lengths)
    and indices (device, int32): row rpi[i] of req_to_token, its first seq_lens[i] slots."""
    bs = rpi.numel()
    seq_host = seq_host.to(torch.int32)
    indptr = torch.zeros(bs + 1, dtype=torch.int32)
    torch.cumsum(seq_host, 0, out=indptr[1:])
    total = int(indptr[-1])
    dev = rpi.device
    lens = seq_lens.to(torch.int64)
    rows = torch.repeat_interleave(rpi, lens, output_size=total)
    starts = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens, output_size=total)
    pos = torch.arange(total, device=dev) - starts
    return indptr, req_to_token[rows, pos].to(torch.int32)


def _paged(cache: torch.Tensor) -> torch.Tensor:
    return cache.unsqueeze(1)  # [slots, Hk, D] -> [pages, page_size 1, Hk, D]: a view


# ---- the ops ----------------------------------------------------------------------------------
def attention_prepare(fb, graph: bool = False) -> None:
    _state(fb.req_to_token).prepare(fb, graph)


def attention_decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    st = _state(req_to_token)
    if not st.accepts(q, k_cache, scale):
        return _triton().attention_decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale)
    w = st.find("decode", req_pool_indices, seq_lens)
    if q.is_cuda and torch.cuda.is_current_stream_capturing() and (w is None or not w.is_cuda_graph_enabled):
        # a graph would capture an eager plan's buffers, re-planned (freed) by later batches
        raise RuntimeError("FlashInfer decode captured in a CUDA graph without attention_prepare(fb, graph=True)")
    if w is None:  # not prepared: plan from the device tensors (one sync)
        w = st.plan_decode(req_to_token, req_pool_indices, seq_lens, seq_lens.to("cpu", torch.int32), False)
    return w.run(q.contiguous(), (_paged(k_cache), _paged(v_cache)))


def attention_extend(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens, extend_lens, scale,
                     max_extend=None):
    st = _state(req_to_token)
    if not st.accepts(q, k_cache, scale):
        return _triton().attention_extend(q, k_cache, v_cache, req_to_token, req_pool_indices,
                                          prefix_lens, extend_lens, scale, max_extend)
    w = st.find("extend", req_pool_indices, extend_lens, prefix_lens)
    if w is None:  # not prepared: plan from the device tensors (one sync)
        seq_lens = prefix_lens + extend_lens
        w = st.plan_extend(req_to_token, req_pool_indices, seq_lens, seq_lens.to("cpu", torch.int32),
                           prefix_lens, extend_lens, extend_lens.to("cpu", torch.int32),
                           (req_pool_indices, prefix_lens, extend_lens))
    return w.run(q.contiguous(), (_paged(k_cache), _paged(v_cache)))
