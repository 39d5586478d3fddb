"""Assembling a runnable engine from ServerArgs: platform, op table, model, KV pool,
scheduler.  Shared by the in-process Engine and the server's scheduler process."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from portaserve.core import ops
from portaserve.core.memory import KVPool, kv_cache_dtype
from portaserve.core.scheduler import Scheduler, SchedulerConfig
from portaserve.models.config import ModelConfig
from portaserve.models.loader import (ModelSource, load_hf_config, load_model, load_tokenizer,
                                      resolve_dtype, resolve_model_path)
from portaserve.models.quantization import quant_config_from_hf
from portaserve.models.registry import build_config
from portaserve.platforms import Platform, resolve_op_table, resolve_platform, set_current_platform
from portaserve.server_args import ServerArgs

logger = logging.getLogger("portaserve")


@dataclass
class Runtime:
    args: ServerArgs
    platform: Platform
    op_table: Any
    source: ModelSource
    model_config: ModelConfig
    model: torch.nn.Module
    tokenizer: Any
    scheduler: Scheduler
    context_len: int
    dtype: torch.dtype
    eos_ids: list
    weight_bytes: int
    tp: Any = None  # tp.TPGroup when --tp-size > 1
    rank_weight_bytes: Optional[list] = None  # every rank's weight bytes (tensor parallel)
    profiler: Any = None  # portaserve.profiler.StepProfiler over this rank's scheduler
    sampling_defaults: dict = field(default_factory=dict)  # --sampling-defaults model

    def __post_init__(self):
        from portaserve.profiler import StepProfiler

        self.profiler = StepProfiler(self.scheduler, self.platform.profiler_activities,
                                     self.tp.rank if self.tp is not None else 0)

    def limits(self):
        from portaserve.core.request_builder import Limits

        return Limits(self.context_len, self.model_config.vocab_size, self.scheduler.allocator.size,
                      grammar=self.scheduler.grammar is not None,
                      max_top_logprobs=self.args.max_top_logprobs_num,
                      sampling_defaults=dict(self.sampling_defaults))

    @property
    def model_name(self) -> str:
        return self.args.served_model_name or self.source.name

    def info(self) -> dict:
        d = {
            **self.platform.describe(),
            "model_path": str(self.source.path),
            "model_path_arg": self.args.model_path,  # as given (a relative path, a repo id)
            "served_model_name": self.model_name,
            "architecture": self.model_config.architecture,
            "dtype": str(self.dtype).replace("torch.", ""),
            "context_length": self.context_len,
            "max_total_num_tokens": self.scheduler.allocator.size,
            "page_size": self.scheduler.page_size,
            "max_running_requests": self.scheduler.cfg.max_running_requests,
            "chunked_prefill_size": self.scheduler.cfg.chunked_prefill_size,
            "enable_mixed_chunk": self.scheduler.cfg.enable_mixed_chunk,
            "schedule_policy": self.scheduler.cfg.schedule_policy,
            "decode_graphs": getattr(self.scheduler.decode_graph, "sizes", None),
            "disable_radix_cache": self.scheduler.tree is None,
            "cascade_attention": self.scheduler.cascade_attention,
            "jump_forward": ("off" if not self.scheduler.jump_forward else
                             "whole-batch" if self.scheduler.jump_whole_batch else "on"),
            "torch_compile_max_bs": (self.args.torch_compile_max_bs if self.args.enable_torch_compile
                                     and self.platform.compile_backend else None),
            "quantization": getattr(self.model_config.quant_config, "name", None),
            "kv_cache_dtype": str(self.scheduler.kv.k[0].dtype).replace("torch.", ""),
            "tp_size": self.args.tp_size,
            "weight_bytes_per_rank": self.rank_weight_bytes or [self.weight_bytes],
            "sampling_defaults": dict(self.sampling_defaults),
            "ops": self.op_table.as_dict(),
        }
        return d

    def startup_report(self) -> str:
        p = self.platform.describe()
        lines = [
            f"platform: {p['platform']}  device: {p['device']} ({p['device_name']})  "
            f"torch {p['torch']}  dist backend: {p['dist_backend']}",
            f"model: {self.source.path} ({self.model_config.architecture}, {self.dtype}, "
            f"{self.weight_bytes / 2**20:.0f} MiB of weights"
            + (f" on each of {self.args.tp_size} tensor-parallel ranks" if self.tp else "")
            + (f"; quantization {self.model_config.quant_config.name}" if self.model_config.quant_config else "")
            + ")",
            f"KV pool: {self.scheduler.allocator.size} tokens (page size {self.scheduler.page_size}), "
            f"context length {self.context_len}, radix cache "
            f"{'off' if self.scheduler.tree is None else 'on'}",
            "sampling defaults: " + (", ".join(f"{k} {v}" for k, v in self.sampling_defaults.items())
                                     + " (the model's generation_config.json; --sampling-defaults openai "
                                     "to ignore it)" if self.sampling_defaults else "openai's"),
            "ops:",
            self.op_table.format(),
        ]
        return "\n".join(lines)


def _generation_config(src: ModelSource) -> dict:
    gen = src.folder / "generation_config.json" if src.kind == "hf" else None
    if gen is None or not gen.exists():
        return {}
    try:
        cfg = json.loads(gen.read_text())
    except ValueError as e:
        raise ValueError(f"{gen} is not valid JSON: {e}") from None
    return cfg if isinstance(cfg, dict) else {}


# the generation_config.json fields that become request defaults (SGLang's and vLLM's set;
# do_sample is not consulted, as neither does: a request that wants greedy says temperature 0)
SAMPLING_DEFAULT_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
                           "repetition_penalty": float}


def _sampling_defaults(args: ServerArgs, src: ModelSource) -> dict:
    """--sampling-defaults model: the model's recommended sampling parameters, which a
    request's own values override; checked here, so a bad file fails the start, not each
    request."""
    if args.sampling_defaults != "model":
        return {}
    gen = _generation_config(src)
    out = {}
    for name, typ in SAMPLING_DEFAULT_FIELDS.items():
        v = gen.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and v != int(v)):
            raise ValueError(f"generation_config.json: {name} is {v!r}, not a number; "
                             "--sampling-defaults openai ignores the file")
        out[name] = typ(v)
    if out.get("top_k") == 0:  # transformers' "no top-k"; ours is -1
        out["top_k"] = -1
    if out:
        from portaserve.core.sampling_params import InvalidRequest, SamplingParams

        try:
            SamplingParams.from_dict(dict(out))
        except InvalidRequest as e:
            raise ValueError(f"generation_config.json: {e}; --sampling-defaults openai ignores the file") from None
    return out


def _eos_ids(cfg: ModelConfig, tokenizer, src: ModelSource) -> list:
    ids = set(cfg.eos_token_ids)
    e = _generation_config(src).get("eos_token_id")
    ids.update(e if isinstance(e, list) else [e] if e is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None)


def _pool_tokens(args: ServerArgs, platform: Platform, cfg: ModelConfig, dtype, weight_bytes, context_len) -> int:
    if args.max_total_tokens:
        return int(args.max_total_tokens)
    from portaserve.models.llama import attention_shards

    kv_heads = attention_shards(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)[1]
    per_token = KVPool.bytes_per_token(cfg.num_layers, kv_heads, cfg.head_dim, dtype)
    mem = platform.memory_info()
    frac = args.mem_fraction_static or platform.default_mem_fraction_static
    if platform.device_type == "cpu":
        # ranks of one node share its memory
        local_ranks = max(1, args.tp_size // args.nnodes)
        budget = mem.total_bytes * frac / local_ranks - weight_bytes
        budget = min(budget, mem.free_bytes * 0.9)
    else:
        # weights are already resident: keep (1 - frac) of the device free for activations
        budget = mem.free_bytes - mem.total_bytes * (1 - frac)
    tokens = int(budget // per_token)
    if tokens < context_len:
        logger.warning("KV pool of %d tokens is smaller than the context length %d", tokens, context_len)
    if tokens < 64:
        raise RuntimeError(
            f"not enough memory for a KV pool ({budget / 2**20:.0f} MiB left after weights); "
            "lower the context or raise --mem-fraction-static / set --max-total-tokens")
    return tokens


class CompiledDecode:
    """The decode forward under torch.compile (--enable-torch-compile), for batches of at
    most max_bs.  Attention and collectives run as opaque custom ops and the elementwise
    ops in native form (core/ops: use_opaque_ops), so the whole forward compiles into
    one graph per batch shape, its small ops fused.  With
    specialize (graph capture: one compile per captured size) shapes are static; without,
    the batch dimension turns dynamic after its second size.  Same can_run/replay
    interface as a graph runner, so the scheduler runs it in place of eager decode."""

    def __init__(self, model, backend: str, max_bs: int, specialize: bool):
        import torch._dynamo

        ops.use_opaque_ops()
        self.max_bs = max_bs
        self.specialize = specialize
        # one compiled graph per captured batch size, two with cascade attention (plain and
        # with tiles), plus headroom
        from portaserve.platforms.cuda.graph_runner import batch_size_ladder

        limit = 2 * len(batch_size_ladder(max_bs)) + 16
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))

        def forward(fb):
            return model.compute_logits(model(fb))

        self.fn = torch.compile(forward, backend=backend, dynamic=False if specialize else None)

    def can_run(self, fb) -> bool:
        # eager (unspecialized) compiles would retrace for every cascade tile count
        return fb.batch_size <= self.max_bs and (self.specialize or fb.shared is None)

    def replay(self, fb):
        ops.attention_prepare(fb)
        return self.fn(fb)


def cascade_attention_enabled(args, table, radix_cache: bool) -> bool:
    """--cascade-attention: auto turns it on where attention_decode_shared has a kernel
    (its native form is a reference computation, slower than plain decode attention)."""
    if args.cascade_attention == "off" or not radix_cache:
        return False
    choice = table.choices.get("attention_decode_shared")
    return args.cascade_attention == "on" or (choice is not None and choice.provider != "native")


def jump_forward_mode(args, graphs: bool) -> str:
    """"off", "on", or "whole-batch" (jump only when every running request jumps).
    --jump-forward auto is "on" where decode runs eagerly and "off" where decode
    steps replay captured graphs: a jump re-prefills the forced tokens in an extra,
    eager extend pass costing about six graphed decode steps, so on a GPU it pays only
    for single streams (H200, 8B, JSON schema: batch 1 -5.8% wall with whole-batch
    jumps; batch 16 +28.5% even whole-batch, +84% always; docs/BENCHMARKS.md)."""
    if args.disable_jump_forward or args.jump_forward == "off":
        return "off"
    if args.jump_forward == "whole-batch":
        return "whole-batch"
    return "on" if args.jump_forward == "on" or not graphs else "off"


def scheduler_config(args: ServerArgs, context_len: int, tokens: int, overlap: bool,
                     deterministic: bool = False) -> SchedulerConfig:
    """The scheduler's settings from the server's flags, for a pool of `tokens` KV slots
    (also bench schedule's, which replays a dataset through the scheduler alone)."""
    return SchedulerConfig(
        context_len=context_len,
        max_total_tokens=tokens,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size,
        max_prefill_tokens=args.max_prefill_tokens,
        page_size=args.page_size,
        schedule_policy=args.schedule_policy,
        disable_radix_cache=args.disable_radix_cache,
        random_seed=args.random_seed,
        overlap=overlap,
        overlap_prefill=not args.disable_overlap_prefill,
        deterministic=deterministic,
        enable_mixed_chunk=args.enable_mixed_chunk,
        # SGLang's --schedule-conservativeness scales both ends of the estimate
        init_new_token_ratio=min(SchedulerConfig.init_new_token_ratio * args.schedule_conservativeness, 1.0),
        min_new_token_ratio=min(SchedulerConfig.min_new_token_ratio * args.schedule_conservativeness, 1.0),
    )


def build_runtime(args: ServerArgs, tp_rank: int = 0) -> Runtime:
    """The runtime of one rank (rank 0 unless called by a tensor-parallel follower;
    rank 0 of node 0 starts the other ranks of its node)."""
    args.validate()
    platform = resolve_platform(args.device)
    set_current_platform(platform)
    src = resolve_model_path(args.model_path, revision=args.revision)
    hf = load_hf_config(src)
    cfg = build_config(hf)
    cfg.quant_config = quant_config_from_hf(hf, args.quantization)  # quantized GEMMs, or None
    dtype = resolve_dtype(args.dtype, cfg, platform)
    context_len = cfg.context_length
    if args.context_length is not None:
        if args.context_length > cfg.max_position_embeddings:
            raise ValueError(f"--context-length {args.context_length} exceeds the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        context_len = args.context_length
    if args.tp_size > 1:
        from portaserve.models.llama import check_tp

        check_tp(cfg, args.tp_size)  # before any rank starts
    tp = None
    if args.tp_size > 1:
        from portaserve import tp as tpmod

        tpmod.check_no_process_group()
        procs = []
        if tp_rank == 0:
            args = tpmod.with_rendezvous(args)
            procs = tpmod.spawn_ranks(args, range(1, tpmod.ranks_per_node(args)))
        try:
            tp = tpmod.join(args, platform, tp_rank, procs)
        except BaseException:
            for p in procs:
                p.terminate()
            raise
    try:
        return _build_rank(args, platform, src, cfg, dtype, context_len, tp)
    except BaseException:
        if tp is not None:  # do not leave the other ranks waiting in a collective
            tp.abort()
        raise


def _resolve_table(platform, args, model):
    from portaserve.core.ops import OpResolutionError

    try:
        return resolve_op_table(platform, args.kernel_overrides(), model)
    except OpResolutionError as e:
        if args.attention_backend and "attention_" in str(e):
            raise OpResolutionError(f"--attention-backend {args.attention_backend}: {e}") from None
        raise


def _build_rank(args, platform, src, cfg, dtype, context_len, tp) -> Runtime:
    """Op table, model, KV pool and scheduler of this rank, on its device."""
    defaults = _sampling_defaults(args, src)  # a bad generation_config.json fails before the load
    device = platform.device()  # after binding this rank's device
    from portaserve.models.llama import attention_shards

    # after the device is bound (start-up kernel checks run on this rank's device); providers
    # with kernels for some models only (FlashInfer) see this rank's attention shape
    heads, kv_heads, _ = attention_shards(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    table = _resolve_table(platform, args, {
        "dtype": dtype, "kv_dtype": kv_cache_dtype(args.kv_cache_dtype, dtype), "head_dim": cfg.head_dim,
        "heads": heads, "kv_heads": kv_heads})
    ops.use_table(table)
    tokenizer = None if args.skip_tokenizer_init else load_tokenizer(
        src, args.tokenizer_path, trust_remote_code=args.trust_remote_code, tokenizer_mode=args.tokenizer_mode,
        chat_template=args.chat_template)
    model = load_model(src, cfg, dtype, device, args.load_format, args.random_seed)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    rank_bytes = None
    if tp is not None:
        rank_bytes = tp.gather_object(weight_bytes)
    kv_dtype = kv_cache_dtype(args.kv_cache_dtype, dtype)  # --kv-cache-dtype (fp8 KV cache)
    tokens = _pool_tokens(args, platform, cfg, kv_dtype, weight_bytes, context_len)
    if tp is not None:  # the scheduler replicas must agree on the pool size
        tokens = tp.min_int(tokens)
    page = args.page_size
    tokens = tokens - tokens % page
    kv_heads = model.layers[0].self_attn.nkv  # this rank's (split or replicated) KV heads
    kv = KVPool(cfg.num_layers, tokens + page, kv_heads, cfg.head_dim, kv_dtype, device)
    kv.zero_padding(page)
    eos = _eos_ids(cfg, tokenizer, src)

    def decode_fn(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    grammar = None
    if args.grammar_backend == "xgrammar" and tokenizer is not None:
        from portaserve.core.grammar import GrammarBackend

        grammar = GrammarBackend(tokenizer, cfg.vocab_size, eos, pin_memory=platform.pin_memory)
    sched = Scheduler(
        scheduler_config(args, context_len, tokens, overlap=not args.disable_overlap_schedule and platform.overlap_schedule,
                         deterministic=tp is not None),
        model, kv, device, eos, decode_fn if tokenizer is not None else None, grammar,
        jump_forward=False, rng_device=platform.rng_device(),
        inference_mode=platform.inference_mode, pin_memory=platform.pin_memory)
    sched.cascade_attention = cascade_attention_enabled(args, table, sched.tree is not None)
    graphs = platform.supports_graphs and not args.disable_cuda_graph
    compiled = None
    if args.enable_torch_compile:
        if platform.compile_backend is None:
            logger.warning("--enable-torch-compile: the %s platform compiles whole graphs already; ignored",
                           platform.name)
        else:
            compiled = CompiledDecode(model, platform.compile_backend, args.torch_compile_max_bs,
                                      specialize=graphs)
    if graphs:
        max_bs = args.cuda_graph_max_bs or min(args.max_running_requests, 256)
        sched.decode_graph = platform.decode_graph_runner(model, kv, sched.req_pool, max_bs, compiled,
                                                          cascade=sched.cascade_attention)
        if sched.decode_graph is None and compiled is not None:
            logger.warning("--enable-torch-compile: decode graph capture failed; decoding eagerly, uncompiled")
    elif compiled is not None:
        sched.decode_graph = compiled  # compiled eager decode for batches it covers
    # XLA: batches padded on the host to the runner's buckets (see Scheduler.padding)
    sched.padding = getattr(sched.decode_graph, "padding", None)
    sched.lazy_device = platform.lazy_tensors
    sched.cut_graph = getattr(sched.decode_graph, "cut", None)
    if sched.lazy_device and sched.cut_graph is None:  # lazy tensors but no runner cutting graphs:
        sched.overlap = False  # each step's graph would grow with the previous step's
    # from the configuration, not from whether capture succeeded: tensor-parallel ranks
    # must all take the same scheduling decisions
    mode = jump_forward_mode(args, graphs)
    sched.jump_forward = sched.tree is not None and mode != "off"
    sched.jump_whole_batch = mode == "whole-batch"
    return Runtime(args, platform, table, src, cfg, model, tokenizer, sched, context_len, dtype,
                   eos, weight_bytes, tp, rank_bytes, sampling_defaults=defaults)
