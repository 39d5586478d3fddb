"""Dependencies point one way: nothing in portaserve/core or portaserve/models imports a
platform package or a vendor library, or asks torch vendor questions (torch.cuda,
torch.xpu, torch.version.hip, tensor.cuda()).  The check parses the source with ``ast``,
so comments and docstrings that mention these names are fine."""
from __future__ import annotations

import ast
import pathlib
import textwrap

import pytest

import portaserve

PKG_ROOT = pathlib.Path(portaserve.__file__).resolve().parent
SCANNED = ("core", "models")

FORBIDDEN_MODULES = ("portaserve.platforms", "flashinfer", "aiter", "torch_xla",
                     "intel_extension_for_pytorch", "triton")
FORBIDDEN_TORCH_ATTRS = ("torch.cuda", "torch.xpu", "torch.version.hip")
IMPORT_FUNCS = {"import_module", "__import__", "find_spec"}


def _forbidden_module(name: str) -> str | None:
    for m in FORBIDDEN_MODULES:
        if name == m or name.startswith(m + "."):
            return m
    return None


def _dotted(node: ast.AST) -> str | None:
    """'a.b.c' for Name/Attribute chains, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def scan_source(src: str, module: str = "portaserve.core.x", filename: str = "<src>") -> list[str]:
    """Violations in one module's source, as 'file:line: message'."""
    tree = ast.parse(src, filename)
    package = module.rsplit(".", 1)[0]
    out: list[str] = []

    def flag(node, msg):
        out.append(f"{filename}:{getattr(node, 'lineno', 0)}: {msg}")

    # names bound to torch / torch.version / torch.cuda ... by imports, for alias tracking
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if (m := _forbidden_module(a.name)):
                    flag(node, f"imports {a.name} ({m})")
                if a.name == "torch" or a.name.startswith("torch."):
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases["torch"] = "torch"
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                full = f"{mod}.{a.name}"
                if (m := _forbidden_module(mod) or _forbidden_module(full)):
                    flag(node, f"imports {full} ({m})")
                if (t := next((t for t in FORBIDDEN_TORCH_ATTRS if full == t or full.startswith(t + ".")), None)):
                    flag(node, f"imports {full} ({t})")
                if mod == "torch" or mod.startswith("torch."):
                    aliases[a.asname or a.name] = full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name:
                head, _, rest = name.partition(".")
                if head in aliases:
                    full = aliases[head] + ("." + rest if rest else "")
                    for t in FORBIDDEN_TORCH_ATTRS:
                        if full == t or full.startswith(t + "."):
                            # report the outermost chain only once
                            flag(node, f"uses {full} ({t})")
                            break
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "cuda":
                flag(node, "calls .cuda(")
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            args = node.args
            if fname in IMPORT_FUNCS and args and isinstance(args[0], ast.Constant) \
                    and isinstance(args[0].value, str) and (m := _forbidden_module(args[0].value)):
                flag(node, f"{fname}({args[0].value!r}) ({m})")
            if fname == "getattr" and len(args) >= 2 and isinstance(args[1], ast.Constant):
                target = _dotted(args[0])
                if target and target.split(".")[0] in aliases:
                    full = aliases[target.split(".")[0]] + target[len(target.split(".")[0]):]
                    full = f"{full}.{args[1].value}"
                    if any(full == t for t in FORBIDDEN_TORCH_ATTRS):
                        flag(node, f"getattr reaches {full}")
    # an Attribute chain like torch.cuda.is_available is reported once per node level;
    # keep one message per line and name
    return sorted(set(out))


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG_ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] + ["__init__"]
    return ".".join(parts)


def _files():
    files = []
    for sub in SCANNED:
        files.extend(sorted((PKG_ROOT / sub).rglob("*.py")))
    return files


def test_scanned_tree_is_not_empty():
    files = _files()
    names = {f.relative_to(PKG_ROOT).as_posix() for f in files}
    assert "core/radix_cache.py" in names and "core/ops/native.py" in names
    assert any(n.startswith("models/") for n in names)


def test_core_and_models_are_platform_neutral():
    violations = []
    for f in _files():
        violations += scan_source(f.read_text(), _module_name(f), str(f.relative_to(PKG_ROOT.parent)))
    assert not violations, "layering violations:\n" + "\n".join(violations)


# ---- the scanner flags what it should (and nothing else) -------------------------------
OFFENDING = {
    "import_platforms": "import portaserve.platforms",
    "import_platform_sub": "import portaserve.platforms.cuda as c",
    "from_platforms": "from portaserve.platforms import current_platform",
    "from_portaserve_platforms": "from portaserve import platforms",
    "relative_platforms": "from ..platforms import cuda",
    "relative_platforms_sub": ("from ...platforms.cuda import CudaPlatform", "portaserve.core.ops.mod"),
    "flashinfer": "import flashinfer",
    "aiter": "from aiter import flash_attn_func",
    "torch_xla": "import torch_xla.core.xla_model as xm",
    "ipex": "import intel_extension_for_pytorch as ipex",
    "triton": "import triton\nimport triton.language as tl",
    "triton_from": "from triton import jit",
    "torch_cuda": "import torch\nok = torch.cuda.is_available()",
    "torch_cuda_bare": "import torch\nm = torch.cuda",
    "torch_xpu": "import torch\ntorch.xpu.synchronize()",
    "torch_hip": "import torch\nif torch.version.hip:\n    pass",
    "aliased_torch": "import torch as T\nT.cuda.synchronize()",
    "from_torch_import_cuda": "from torch import cuda",
    "from_torch_version_hip": "from torch.version import hip",
    "torch_version_alias": "import torch.version as tv\nx = tv.hip",
    "dot_cuda_call": "def f(x):\n    return x.cuda()",
    "dot_cuda_call_args": "def f(x):\n    return x.float().cuda(0, non_blocking=True)",
    "import_module": "import importlib\nm = importlib.import_module('flashinfer.decode')",
    "dunder_import": "m = __import__('aiter')",
    "getattr_cuda": "import torch\nc = getattr(torch, 'cuda')",
}


@pytest.mark.parametrize("name", list(OFFENDING))
def test_scanner_flags_offending_snippet(name):
    src, module = OFFENDING[name] if isinstance(OFFENDING[name], tuple) else (OFFENDING[name], "portaserve.core.mod")
    found = scan_source(src, module)
    assert found, f"scanner missed: {src!r}"


def test_scanner_accepts_clean_code():
    src = textwrap.dedent('''
        """Docstrings may say torch.cuda, torch.version.hip, import flashinfer or x.cuda()."""
        import torch
        import torch.nn.functional as F
        from portaserve.core.ops import registry  # comment: torch.xpu, triton, .cuda(
        from . import native
        from ..models import layers

        # torch.cuda.is_available() in a comment is fine
        text = "torch.cuda.synchronize() inside a string"
        device = torch.device("cuda")  # a device string is data, not a vendor call
        def f(x, cuda=None):
            y = x.to(device)
            z = F.silu(y)
            return torch.version.__version__ if cuda else z
        class Model:
            cuda_graphs = False
        m = Model().cuda_graphs
        flashinfer_like = "import aiter"
    ''')
    assert scan_source(src, "portaserve.core.mod") == []


def test_relative_import_resolution_is_package_aware():
    # from .platforms inside portaserve/ (not core) resolves to portaserve.platforms
    assert scan_source("from .platforms import cuda", "portaserve.engine")
    # the same text inside portaserve/core means portaserve.core.platforms: not a platform
    assert scan_source("from .platforms import cuda", "portaserve.core.thing") == []
    assert scan_source("from .. import platforms", "portaserve.core.thing")
