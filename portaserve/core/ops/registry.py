"""The op registry: declarations, providers, and per-platform resolution.

An op is declared once with its native torch implementation (the universal fallback and
the oracle every other provider is tested against).  A provider registers metadata only:

    register_provider("rmsnorm", "triton", platforms=("cuda", "rocm", "xpu"),
                      target="portaserve.platforms.triton_ops.norm:rmsnorm",
                      requires=needs_module("triton"))

``target`` is imported lazily, so importing the core never imports a vendor library.
``requires`` returns None when the provider can run, or a human reason when it cannot.
``resolve_ops(platform)`` walks the platform's priority list per op family and keeps the
first provider whose requirement and import succeed; native is always last.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

Requirement = Callable[[], Optional[str]]


@dataclass(frozen=True)
class OpDecl:
    name: str
    family: str
    native: Callable
    doc: str = ""


@dataclass(frozen=True)
class Provider:
    op: str
    name: str
    platforms: tuple  # platform names, or ("*",) for any
    target: str  # "module:attr"
    requires: Optional[Requirement] = None
    # the model's side: given {"dtype", "kv_dtype", "head_dim"}, None or why not (a
    # provider with kernels for some shapes only)
    supports: Optional[Callable[[dict], Optional[str]]] = None

    def check(self, platform_name: str, model: Optional[dict] = None) -> Optional[str]:
        if "*" not in self.platforms and platform_name not in self.platforms:
            return f"not for platform {platform_name} (only {', '.join(self.platforms)})"
        if self.requires is not None:
            try:
                reason = self.requires()
            except Exception as e:
                reason = f"requirement check raised {type(e).__name__}: {e}"
            if reason:
                return reason
        if model is not None and self.supports is not None:
            try:
                reason = self.supports(model)
            except Exception as e:
                reason = f"model check raised {type(e).__name__}: {e}"
            if reason:
                return reason
        return None

    def load(self) -> Callable:
        mod, attr = self.target.split(":")
        return getattr(importlib.import_module(mod), attr)


OPS: dict[str, OpDecl] = {}
PROVIDERS: dict[tuple[str, str], Provider] = {}


def declare_op(name: str, family: str, native: Callable, doc: str = "") -> None:
    if name in OPS:
        raise ValueError(f"op {name!r} declared twice")
    OPS[name] = OpDecl(name, family, native, doc)
    target = f"{native.__module__}:{native.__name__}"
    register_provider(name, "native", ("*",), target)


def register_provider(op: str, provider: str, platforms, target: str,
                      requires: Optional[Requirement] = None, supports=None) -> None:
    if op not in OPS:
        raise ValueError(f"cannot register provider {provider!r} for undeclared op {op!r}")
    key = (op, provider)
    if key in PROVIDERS:
        raise ValueError(f"provider {provider!r} for op {op!r} registered twice")
    PROVIDERS[key] = Provider(op, provider, tuple(platforms), target, requires, supports)


def providers_for(op: str) -> list[Provider]:
    return [p for (o, _), p in PROVIDERS.items() if o == op]


# ---- common requirement predicates ------------------------------------------------------
def needs_module(module: str, hint: str = "") -> Requirement:
    def check():
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed" + (f" ({hint})" if hint else "")
        return None

    return check


def all_of(*reqs: Requirement) -> Requirement:
    def check():
        for r in reqs:
            reason = r()
            if reason:
                return reason
        return None

    return check


# ---- resolution -------------------------------------------------------------------------
@dataclass
class OpChoice:
    op: str
    provider: str
    fn: Callable
    rejected: list = field(default_factory=list)  # [(provider, reason)]
    forced: bool = False


class OpResolutionError(RuntimeError):
    pass


@dataclass
class OpTable:
    platform: str
    choices: dict[str, OpChoice]

    def fn(self, op: str) -> Callable:
        return self.choices[op].fn

    def as_dict(self) -> dict:
        return {
            op: {
                "provider": c.provider,
                "forced": c.forced,
                "rejected": [{"provider": p, "reason": r} for p, r in c.rejected],
            }
            for op, c in self.choices.items()
        }

    def format(self) -> str:
        lines = []
        width = max((len(o) for o in self.choices), default=4)
        for op, c in self.choices.items():
            rej = "; ".join(f"{p}: {r}" for p, r in c.rejected)
            lines.append(f"  {op:<{width}}  {c.provider:<10}" + (f"  (rejected {rej})" if rej else ""))
        return "\n".join(lines)


def parse_kernel_overrides(specs) -> dict[str, str]:
    """['attention_decode=native', 'all=native'] -> dict.  Raises ValueError on bad input."""
    out: dict[str, str] = {}
    for spec in specs or []:
        if "=" not in spec:
            raise ValueError(f"--kernel expects OP=PROVIDER, got {spec!r}")
        op, prov = (s.strip() for s in spec.split("=", 1))
        if op != "all" and op not in OPS:
            raise ValueError(f"--kernel {spec}: unknown op {op!r}; ops: {', '.join(OPS)}")
        out[op] = prov
    return out


def resolve_ops(platform, overrides: Optional[dict] = None, model: Optional[dict] = None) -> OpTable:
    """model: {"dtype", "kv_dtype", "head_dim"} of the model to serve, when known."""
    overrides = dict(overrides or {})
    everything = overrides.pop("all", None)
    choices: dict[str, OpChoice] = {}
    for op, decl in OPS.items():
        if op in HOOKS and op not in overrides:
            choices[op] = None  # set by _follow_hooks once the ops it plans for are chosen
            continue
        forced = overrides.get(op, everything)
        cands = {p.name: p for p in providers_for(op)}
        if forced is not None:
            if forced not in cands:
                raise OpResolutionError(
                    f"--kernel {op}={forced}: no such provider; known: {', '.join(cands)}")
            p = cands[forced]
            reason = p.check(platform.name, model)
            if reason is None:
                try:
                    fn = p.load()
                except Exception as e:
                    reason = f"import failed: {type(e).__name__}: {e}"
            if reason is not None:
                raise OpResolutionError(f"--kernel {op}={forced} cannot run here: {reason}")
            choices[op] = OpChoice(op, forced, fn, [], forced=True)
            continue
        prio = getattr(platform, "op_priority", lambda _op: None)(op) or platform.provider_priority(decl.family)
        order = [n for n in prio if n != "native"]
        order += [n for n in cands if n not in order and n != "native"] + ["native"]
        rejected = []
        chosen = None
        for name in order:
            p = cands.get(name)
            if p is None:
                continue
            reason = p.check(platform.name, model)
            if reason is None:
                try:
                    chosen = OpChoice(op, name, p.load(), rejected)
                    break
                except Exception as e:
                    reason = f"import failed: {type(e).__name__}: {e}"
            if name in prio or "*" in p.platforms or platform.name in p.platforms:
                rejected.append((name, reason))
        assert chosen is not None, f"native provider of {op} failed to load"
        choices[op] = chosen
    _follow_hooks(choices, overrides)
    return OpTable(platform.name, choices)


# planning hooks -> the ops they plan for: a hook runs the provider those ops run (where it
# has one; else native), whatever the priorities or --kernel all=... say, so a provider that
# plans on the host (FlashInfer) always gets its plans
HOOKS = {"attention_prepare": ("attention_extend", "attention_decode")}


def _follow_hooks(choices: dict, overrides: dict) -> None:
    for hook, users in HOOKS.items():
        if hook not in choices:
            continue
        wanted = [choices[u].provider for u in users
                  if choices[u].provider != "native" and (hook, choices[u].provider) in PROVIDERS]
        target = wanted[0] if wanted else "native"
        current = choices[hook]
        if current is not None and current.provider == target:
            continue
        if hook in overrides:
            users_on = ", ".join(f"{u}={choices[u].provider}" for u in users)
            raise OpResolutionError(f"--kernel {hook}={overrides[hook]} does not fit {users_on}: "
                                    f"{hook} must be {target} (it follows the attention ops; leave it out)")
        # the users' providers passed their checks already: only load the hook (forced when
        # the ops it follows were)
        choices[hook] = OpChoice(hook, target, PROVIDERS[(hook, target)].load(),
                                 forced=all(choices[u].forced for u in users))
