import os
import subprocess
import sys

import pytest
import torch
from dsc.kernels.add_rms_norm import add_rms_norm_ref

from tests.tolerances import TOL


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 100), (1, 1, 7)])
def test_cpu_matches_reference(shape):
    x, r = torch.randn(shape), torch.randn(shape)
    w = torch.randn(shape[-1])
    y, s = torch.ops.dsc.add_rms_norm(x, r, w, 1e-6)
    y_ref, s_ref = add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref, **TOL["fp32_reassoc"])
    assert torch.isfinite(y).all()


def test_fake_shapes_under_export():
    class M(torch.nn.Module):
        def forward(self, x, r, w):
            return torch.ops.dsc.add_rms_norm(x, r, w, 1e-6)

    ep = torch.export.export(M(), (torch.randn(2, 8), torch.randn(2, 8), torch.randn(8)))
    y, s = ep.module()(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8))
    assert y.shape == s.shape == (2, 8)


TRITON_CHECK = """
import torch
from dsc.kernels.add_rms_norm import add_rms_norm_ref, add_rms_norm_triton
for shape in [(4, 64), (3, 100), (2, 3, 130)]:
    x, r, w = torch.randn(shape), torch.randn(shape), torch.randn(shape[-1])
    y, s = add_rms_norm_triton(x, r, w, 1e-6)
    y_ref, s_ref = add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.allclose(s, s_ref, atol=1e-6), (s - s_ref).abs().max()
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-4), (y - y_ref).abs().max()
print("ok")
"""


def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernel_on_gpu():
    for dtype in (torch.float32, torch.bfloat16):
        x, r = torch.randn(64, 1024, device="cuda", dtype=dtype), torch.randn(64, 1024, device="cuda", dtype=dtype)
        w = torch.randn(1024, device="cuda", dtype=dtype)
        y, s = torch.ops.dsc.add_rms_norm(x, r, w, 1e-6)
        y_ref, s_ref = add_rms_norm_ref(x.float(), r.float(), w.float(), 1e-6)
        torch.testing.assert_close(s.float(), s_ref, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(y.float(), y_ref, atol=5e-2, rtol=2e-2)
