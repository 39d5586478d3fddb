"""The ``portaserve`` command: serve, generate, env, bench (serving, offline, one-batch, ...)."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")


def _format_op_table(table) -> str:
    """The op table with each distinct rejection reason written once, as a footnote."""
    notes: list[str] = []
    width = max((len(o) for o in table.choices), default=4)
    lines = []
    for op, c in table.choices.items():
        rej = []
        for prov, reason in c.rejected:
            if reason not in notes:
                notes.append(reason)
            rej.append(f"{prov} [{notes.index(reason) + 1}]")
        forced = " (forced)" if c.forced else ""
        lines.append(f"  {op:<{width}}  {c.provider + forced:<10}" + (f"  rejected: {', '.join(rej)}" if rej else ""))
    lines += [f"    [{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def cmd_env(ns) -> int:
    """Platforms, their probes, and the op table each would use."""
    import torch

    from portaserve.platforms import platform_classes, probe_all, resolve_op_table, resolve_platform

    print(f"portaserve {__import__('portaserve').__version__}  python {sys.version.split()[0]}  "
          f"torch {torch.__version__} (cuda {torch.version.cuda}, hip {getattr(torch.version, 'hip', None)})")
    probes = probe_all()
    try:
        chosen = resolve_platform(ns.device)
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\nplatforms (probe order):")
    for name, reason in probes.items():
        mark = "*" if name == chosen.name else " "
        print(f" {mark} {name:<6} {'available' if reason is None else 'unavailable: ' + reason}")
    classes = platform_classes()
    show = list(classes) if ns.all else [chosen.name]
    for name in show:
        p = classes[name]()
        try:
            table = resolve_op_table(p, ns.kernel or [])
        except (ValueError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if name == chosen.name:
            note = " (selected)"
        elif probes.get(name) is not None:
            note = f" (what it would choose; unavailable here: {probes[name]})"
        else:
            note = ""
        print(f"\nop table for {name}{note}:")
        print(_format_op_table(table))
    print(f"\n{chosen.name} platform:")
    for k, v in chosen.describe().items():
        print(f"  {k:<14} {v}")
    return 0


def cmd_generate(ns, args) -> int:
    from portaserve.engine import Engine
    from portaserve.core.sampling_params import InvalidRequest, SamplingParams

    sp = {"max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature}
    try:  # before the model loads
        SamplingParams.from_dict(sp)
    except InvalidRequest as e:
        print(f"portaserve: error: {e}", file=sys.stderr)
        return 2
    with Engine(server_args=args) as engine:
        prompt = ns.prompt
        if ns.chat and engine.tokenizer is not None and engine.tokenizer.chat_template:
            prompt = engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        try:
            last = ""
            for chunk in engine.generate(prompt, sp, stream=True):
                sys.stdout.write(chunk["text"][len(last):])
                sys.stdout.flush()
                last = chunk["text"]
        except InvalidRequest as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 2
        print()
        m = chunk["meta_info"]
        print(f"[{m['prompt_tokens']} prompt tokens, {m['completion_tokens']} generated, "
              f"finish: {m['finish_reason']}]", file=sys.stderr)
    return 0


# `portaserve bench NAME ...` runs `python -m portaserve.bench.<module> ...` (each has its own
# options: `portaserve bench NAME --help`); `bench serving` is parsed here as well
BENCHES = {
    "offline": ("offline", "in-process Engine throughput on a dataset (SGLang's bench_offline_throughput)"),
    "one-batch": ("one_batch", "prefill and per-step decode latency of one static batch (SGLang's bench_one_batch)"),
    "gemm": ("gemm", "quantized GEMMs against bf16 on the Llama-3.1-8B linear shapes"),
    "schedule": ("schedule", "replay a dataset through the scheduler alone (no model): passes, batch sizes, tail"),
    "cascade": ("cascade", "decode attention over shared prefixes: plain against cascade"),
    "sampling": ("sampling", "top-k/top-p/min-p sampling providers against the native op"),
    "grammar": ("grammar_overhead", "per-token cost of constrained decoding (JSON schema)"),
    "lang-tree": ("lang_tree", "a tree of thought through portaserve.lang against one call at a time"),
}


def main(argv=None) -> int:
    from portaserve.server_args import ServerArgs

    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        prog = f"portaserve bench {argv[1]}"
        try:
            return importlib.import_module(f"portaserve.bench.{BENCHES[argv[1]][0]}").main(argv[2:], prog=prog)
        except (ValueError, RuntimeError, OSError) as e:  # a model path, a device, a file that is not there
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2

    parser = argparse.ArgumentParser(prog="portaserve", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p_env = sub.add_parser("env", help="show platforms, probes and the op provider table")
    p_env.add_argument("--device", default="auto")
    p_env.add_argument("--kernel", action="append", help="OP=PROVIDER override to preview")
    p_env.add_argument("--all", action="store_true", help="show the op table of every platform")

    p_gen = sub.add_parser("generate", help="generate a completion for one prompt on the console")
    p_gen.add_argument("prompt")
    p_gen.add_argument("--max-new-tokens", type=int, default=128)
    p_gen.add_argument("--temperature", type=float, default=0.0)
    p_gen.add_argument("--no-chat", dest="chat", action="store_false",
                       help="send the prompt raw instead of through the chat template")
    ServerArgs.add_cli_args(p_gen)

    p_serve = sub.add_parser(
        "serve", help="run the HTTP server (OpenAI + SGLang-native API)",
        description="Run the HTTP server: OpenAI-compatible /v1/completions, "
                    "/v1/chat/completions, /v1/models and SGLang's native /generate API. "
                    "The model runs in a separate scheduler process.")
    ServerArgs.add_cli_args(p_serve)

    p_bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = p_bench.add_subparsers(dest="bench_cmd", required=True)
    p_bs = bench_sub.add_parser("serving", help="load a running server like SGLang's bench_serving")
    from portaserve.bench.serving import add_cli_args as add_bench_serving_args

    add_bench_serving_args(p_bs)
    for name, (module, what) in BENCHES.items():  # listed for --help; run above, with their own options
        bench_sub.add_parser(name, help=f"{what} (python -m portaserve.bench.{module})")

    ns = parser.parse_args(argv)
    if ns.cmd == "env":
        return cmd_env(ns)
    if ns.cmd == "bench":
        from portaserve.bench.serving import run_from_cli

        return run_from_cli(ns)
    args = ServerArgs.from_cli(ns)
    _setup_logging(args.log_level)
    try:
        args.validate()
    except ValueError as e:
        parser.error(str(e))
    if ns.cmd == "generate":
        try:
            return cmd_generate(ns, args)
        except (ValueError, RuntimeError, OSError) as e:  # OSError: a path or repo that is not there
            print(f"portaserve: error: {e}", file=sys.stderr)
            return 2
    if ns.cmd == "serve":
        if args.node_rank > 0:  # only node 0 serves HTTP; the others run their ranks
            from portaserve.tp import run_node

            return run_node(args)
        import socket

        try:  # before the model loads: a host that cannot be bound fails at once
            socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            parser.error(f"--host {args.host!r} cannot be resolved: {e}")
        from portaserve.server.app import serve

        return serve(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
