"""All engine and server options, with SGLang's flag names where SGLang has them.

``ServerArgs`` is used both by ``portaserve.Engine(**kwargs)`` and by the CLI
(``portaserve serve --flag``); every field below becomes ``--field-name``.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional


def _opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ServerArgs:
    model_path: Optional[str] = _opt(None, "Hugging Face folder or .gguf file, or a Hugging Face repo id (org/name: from the local Hugging Face cache, HF_HOME / HF_HUB_CACHE, else downloaded into it unless HF_HUB_OFFLINE=1); default: the built-in SmolLM2-135M-Instruct")
    tokenizer_path: Optional[str] = _opt(None, "tokenizer folder (or Hugging Face repo id) if not the model's own")
    revision: Optional[str] = _opt(None, "model revision (branch, tag or commit) of a Hugging Face repo id given as --model-path (default: main)")
    trust_remote_code: bool = _opt(False, "let transformers run a repo's own tokenizer code (AutoTokenizer's trust_remote_code); portaserve's own model code is unaffected: it runs only the architectures it implements")
    tokenizer_mode: str = _opt("auto", "auto: the fast tokenizer where there is one; slow: the Python tokenizer (use_fast=False; transformers 5 has fast tokenizers only)",
                               choices=["auto", "slow"])
    load_format: str = _opt("auto", "auto: load the checkpoint; dummy: random weights from the config (benchmarks)",
                            choices=["auto", "dummy"])
    quantization: Optional[str] = _opt(None, "quantized GEMMs: fp8 / w8a8_int8 quantize a bf16/fp32 checkpoint at load time; awq, gptq, compressed-tensors (and fp8) checkpoints are detected from their quantization_config",
                                       choices=["fp8", "w8a8_int8", "awq", "gptq", "compressed-tensors"])
    kv_cache_dtype: str = _opt("auto", "KV cache storage: auto (the model dtype) or fp8_e4m3 / fp8_e5m2 (half the memory; values cast with a scale of 1.0)",
                               choices=["auto", "fp8_e4m3", "fp8_e5m2"])
    host: str = _opt("127.0.0.1", "address to bind (default loopback only)")
    port: int = _opt(30000, "HTTP port")
    device: str = _opt("auto", "auto|cuda|rocm|xpu|tpu|cpu, or a plugin platform; also PORTASERVE_DEVICE")
    dtype: str = _opt("auto", "auto|float32|bfloat16|float16 (auto: float32 on CPU, the checkpoint's 16-bit type on GPUs)")
    tp_size: int = _opt(1, "tensor parallel size: one model process per device, weights split over them", aliases=["--tp"])
    nnodes: int = _opt(1, "number of nodes the tensor-parallel ranks span")
    node_rank: int = _opt(0, "this node's index (0 serves HTTP; the others only run ranks)")
    dist_init_addr: Optional[str] = _opt(None, "HOST:PORT of node 0 for the torch.distributed rendezvous (default: a free local port; required when --nnodes > 1)")
    dist_timeout: int = _opt(600, "seconds a rank waits for the others in a collective before giving up")
    context_length: Optional[int] = _opt(None, "maximum tokens per request (prompt + output); default: the model's")
    mem_fraction_static: Optional[float] = _opt(None, "fraction of device memory for weights + KV pool (platform default)")
    max_total_tokens: Optional[int] = _opt(None, "KV pool size in tokens (overrides --mem-fraction-static)")
    max_running_requests: int = _opt(256, "maximum concurrently running requests")
    max_queued_requests: Optional[int] = _opt(None, "beyond this many waiting requests new ones get HTTP 503")
    chunked_prefill_size: int = _opt(8192, "maximum tokens per prefill chunk (<=0 disables chunking)")
    max_prefill_tokens: int = _opt(16384, "maximum prompt tokens in one prefill batch")
    enable_mixed_chunk: bool = _opt(False, "run the running requests' decode step inside each prefill batch instead of pausing them while it runs (the chunk gives up one token per running request)")
    page_size: int = _opt(1, "KV pool page size in tokens")
    schedule_policy: str = _opt("fcfs", "order of admission", choices=["fcfs", "lpm", "dfs-weight", "lof", "random"])
    schedule_conservativeness: float = _opt(1.0, "how much of the running requests' remaining max_new_tokens admission keeps free in the KV pool (SGLang's flag: scales the estimated share, 0.7 at start, decaying to 0.1): above 1 fewer requests are admitted and fewer retracted later, below 1 more are admitted")
    stream_interval: int = _opt(1, "stream a request's tokens to the HTTP side every N tokens (its first token and its end at once): larger values cut per-token work at high concurrency, smaller ones stream more smoothly")
    dp_size: int = _opt(1, "data parallel replicas: only 1 (run several servers behind a load balancer for more)", aliases=["--dp"])
    disable_radix_cache: bool = _opt(False, "turn off prefix caching (RadixAttention)")
    random_seed: int = _opt(0, "seed of the engine's sampling generator")
    sampling_defaults: str = _opt("model", "defaults of the sampling parameters a request leaves out: model: the temperature, top_p, top_k, min_p and repetition_penalty of the model's generation_config.json (as SGLang and vLLM do), the rest as openai; openai: temperature 1, top_p 1, no top_k / min_p / penalty",
                                  choices=["model", "openai"])
    api_key: Optional[str] = _opt(None, "require Authorization: Bearer KEY on every endpoint but /health")
    max_request_body_mb: int = _opt(64, "HTTP request bodies larger than this many MiB get HTTP 413 (0: no limit)")
    served_model_name: Optional[str] = _opt(None, "model name reported by the API (default: the model's)")
    chat_template: Optional[str] = _opt(None, "Jinja chat template file or string overriding the tokenizer's")
    trust_request_chat_template: bool = _opt(False, "let a chat request bring its own Jinja template (chat_template, or chat_template_kwargs.chat_template, as in vLLM): it runs on the server's request-building thread, so without this flag such requests are refused")
    enable_metrics: bool = _opt(False, "serve Prometheus metrics at /metrics")
    log_requests: bool = _opt(False, "log each request as it arrives (id, prompt tokens, sampling parameters) and as it ends (finish reason, tokens, latency)")
    enable_cache_report: bool = _opt(False, "accepted for SGLang command lines: usage.prompt_tokens_details.cached_tokens is always reported")
    skip_server_warmup: bool = _opt(False, "accept requests without first running one short warm-up request (which compiles and caches the kernels the first real request would otherwise wait for)")
    log_level: str = _opt("info", "logging level", choices=["debug", "info", "warning", "error"])
    kernel: list = _opt(None, "force an op provider, OP=PROVIDER (repeatable); all=native bisects numerics",
                        action="append")
    attention_backend: Optional[str] = _opt(None, "attention kernels (SGLang's flag): flashinfer, triton, native, or a platform's own (sdpa on CPU, aiter, ipex, pallas); default: the platform's choice (CUDA: flashinfer for prefill where installed and the model fits, triton for decode). --kernel entries override it op by op")
    max_top_logprobs_num: int = _opt(20, "most top logprobs a request may ask for per token (top_logprobs_num, OpenAI's logprobs / top_logprobs), as vLLM's --max-logprobs: each one is returned for every output token, and with logprob_start_len for every prompt token")
    skip_tokenizer_init: bool = _opt(False, "accept and return token ids only")
    disable_cuda_graph: bool = _opt(False, "run decode eagerly instead of replaying captured CUDA/HIP graphs")
    cuda_graph_max_bs: Optional[int] = _opt(None, "largest decode batch captured in a graph (default: min(max-running-requests, 256))")
    enable_torch_compile: bool = _opt(False, "compile decode forwards with torch.compile (fusing norms, rotary, activations and residual adds around the attention kernels) for batches up to --torch-compile-max-bs; inside CUDA graphs where they are on")
    torch_compile_max_bs: int = _opt(32, "largest decode batch run through the compiled forward (each captured batch size compiles once)")
    cascade_attention: str = _opt("auto", "decode attention reads a prefix shared through the radix cache (a system prompt, few-shot examples) once per group of up to 16 requests instead of once per request: on, off, or auto (on where the attention provider has a kernel for it, e.g. Triton on CUDA/ROCm/XPU)",
                                  choices=["auto", "on", "off"])
    disable_overlap_schedule: bool = _opt(False, "process each decode step's tokens before launching the next (accelerators overlap them by default)")
    disable_overlap_prefill: bool = _opt(False, "with the overlap scheduler, still read the previous step's tokens before launching a prompt pass, and a pass's tokens before the decode step after it (for comparison; by default prompt passes overlap too)")
    tool_call_parser: Optional[str] = _opt(None, "how tool calls are written by the model (default: detected from the chat template)",
                                           choices=["hermes", "llama3", "mistral"])
    reasoning_parser: Optional[str] = _opt(None, "separate a reasoning model's thinking (<think>...</think>) from its answer in chat completions: reasoning_content and content (qwen3: only an explicit <think> block at the start; deepseek-r1: from the first token until </think>); a request can say separate_reasoning false",
                                           choices=["qwen3", "deepseek-r1"])
    grammar_backend: str = _opt("xgrammar", "structured output backend (json_schema / regex / ebnf)",
                                choices=["xgrammar", "none"])
    jump_forward: str = _opt("auto", "append grammar-forced text at once instead of decoding it token by token: on, off, whole-batch (only when every running request jumps at once: pays off for single-stream use on GPUs), or auto (on where decode runs eagerly, off where decode steps replay captured graphs, whose batch a jump's eager extend pass would stall)",
                             choices=["auto", "on", "off", "whole-batch"])
    disable_jump_forward: bool = _opt(False, "same as --jump-forward off")

    def __post_init__(self):
        if self.kernel is None:
            self.kernel = []

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # Engine(**kwargs) skips argparse's checks
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: choose from "
                                 f"{', '.join(choices)}")
        if self.device and self.device.lower() != "auto":  # before a scheduler process starts
            from portaserve.platforms import platform_classes

            if self.device.lower() not in platform_classes():
                raise ValueError(f"--device {self.device!r}: unknown device; known: auto, "
                                 f"{', '.join(platform_classes())}")
        if self.tp_size < 1:
            raise ValueError("--tp-size must be >= 1")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} is not in [0, --nnodes {self.nnodes})")
        if self.tp_size % self.nnodes:
            raise ValueError(f"--tp-size {self.tp_size} is not divisible by --nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--dist-init-addr {self.dist_init_addr!r} is not HOST:PORT")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError("--mem-fraction-static must be in (0, 1)")
        if self.max_total_tokens is not None and self.max_total_tokens < 16:
            raise ValueError("--max-total-tokens must be at least 16")
        if self.max_running_requests < 1:
            raise ValueError("--max-running-requests must be >= 1")
        if self.torch_compile_max_bs < 1:
            raise ValueError("--torch-compile-max-bs must be >= 1")
        if self.page_size < 1:
            raise ValueError("--page-size must be >= 1")
        if 0 < self.chunked_prefill_size < self.page_size:  # a chunk is whole pages
            raise ValueError(f"--chunked-prefill-size {self.chunked_prefill_size} is smaller than "
                             f"--page-size {self.page_size}")
        if not 0 < self.schedule_conservativeness <= 10:
            raise ValueError("--schedule-conservativeness must be in (0, 10]")
        if self.max_request_body_mb < 0:
            raise ValueError(f"--max-request-body-mb must be >= 0, got {self.max_request_body_mb}")
        if self.max_top_logprobs_num < 0:
            raise ValueError(f"--max-top-logprobs-num must be >= 0, got {self.max_top_logprobs_num}")
        if self.stream_interval < 1:
            raise ValueError("--stream-interval must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a TCP port (0-65535)")
        for name in ("context_length", "max_prefill_tokens", "cuda_graph_max_bs", "dist_timeout"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"--max-queued-requests must be >= 0, got {self.max_queued_requests}")
        if self.dp_size != 1:
            raise ValueError(f"--dp-size {self.dp_size}: data parallelism is not supported; run "
                             f"{self.dp_size} servers (one per device group) behind a load balancer")
        import portaserve.platforms.providers  # noqa: F401  (registers the providers)
        from portaserve.core.ops import PROVIDERS, parse_kernel_overrides

        # bad --attention-backend / --kernel entries fail here, before any rank starts
        for op, prov in parse_kernel_overrides(self.kernel_overrides()).items():
            known = sorted({p for o, p in PROVIDERS if o == op or op == "all"})
            if prov not in known:
                raise ValueError(f"--kernel {op}={prov}: no such provider; known: {', '.join(known)}")

    # ---- CLI --------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            md = dict(f.metadata)
            flag = "--" + f.name.replace("_", "-")
            names = [flag] + md.pop("aliases", [])
            help_ = md.pop("help", "")
            if f.type in ("bool", bool):
                parser.add_argument(*names, dest=f.name, action="store_true", help=help_)
                continue
            kw = {"dest": f.name, "help": help_ + (f" (default: {f.default})" if f.default not in (None, []) else "")}
            if "action" in md:
                kw["action"] = md.pop("action")
            else:
                typ = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float}.get(str(f.type), str)
                kw["type"] = typ
            if "choices" in md:
                kw["choices"] = md.pop("choices")
            kw["default"] = None if kw.get("action") == "append" else f.default
            parser.add_argument(*names, **kw)

    def kernel_overrides(self) -> list:
        """--attention-backend X as --kernel entries for the attention ops (the cascade kernel
        too where X has one; the planning hook attention_prepare follows them by itself),
        then the explicit --kernel entries, which win."""
        out = []
        if self.attention_backend:
            import portaserve.platforms.providers  # noqa: F401  (registers the providers)
            from portaserve.core.ops import PROVIDERS

            known = sorted({p for op, p in PROVIDERS if op == "attention_decode"})
            if self.attention_backend not in known:
                raise ValueError(f"--attention-backend {self.attention_backend!r}: choose from {', '.join(known)}")
            for op in ("attention_extend", "attention_decode", "attention_decode_shared"):
                if (op, self.attention_backend) in PROVIDERS:
                    out.append(f"{op}={self.attention_backend}")
        return out + list(self.kernel or [])

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> "ServerArgs":
        vals = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
        return cls(**vals)
