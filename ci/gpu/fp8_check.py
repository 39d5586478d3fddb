"""Where an FP8 W8A8 float32 path departs from exact arithmetic on this GPU: the Triton
per-token quantizer against torch's cast, and the _scaled_mm product against float64 math
on the same quantized values (small K, as in tests/test_quantization.py)."""
import torch

from portaserve.core.ops.quant import quantize_fp8
from portaserve.platforms.cuda import quant_ops
from portaserve.platforms.triton_kernels.quant import per_token_quant

g = torch.Generator().manual_seed(0)
for K, N in ((64, 192), (160, 64), (64, 320)):
    x = torch.randn(40, K, generator=g).cuda()
    q, s = per_token_quant(x, "fp8", None, 0)
    rq, rs = quantize_fp8(x, None)
    nd = int((q.float() != rq.float()).sum())
    w = (torch.randn(N, K, generator=g) / K ** 0.5).cuda()
    ws = w.abs().amax(1) / 448.0
    wq = (w / ws[:, None]).to(torch.float8_e4m3fn)
    exact = (rq.double() * rs.double()) @ (wq.double() * ws.double()[:, None]).t()
    rows = {}
    for fast in (False, True):
        quant_ops._FAST_ACCUM = fast
        for dt in (torch.float32, torch.bfloat16):
            y = quant_ops.fp8_scaled_mm(x.to(dt), wq, ws, None, dt).double()
            rows[f"{'fast' if fast else 'exact'}-accum {str(dt)[6:]}"] = ((y - exact).abs().max() / exact.abs().max()).item()
    one = torch.ones((), device="cuda")
    y = torch._scaled_mm(rq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32).double()
    ex1 = rq.double() @ wq.double().t()
    print(f"K={K} N={N}: quantizer q differs in {nd}/{q.numel()} (max {(q.float() - rq.float()).abs().max().item()}), "
          f"scale rel diff {((s - rs).abs() / rs).max().item():.2e}; unscaled fp32 _scaled_mm rel err "
          f"{((y - ex1).abs().max() / ex1.abs().max()).item():.2e}; provider rel err vs float64: "
          + ", ".join(f"{k} {v:.2e}" for k, v in rows.items()))
