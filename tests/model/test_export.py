"""torch.export of the prefill and decode entry points, with dynamic batch, sequence and context."""

import pytest
import torch
from dsc.model import DeepseekV32ForCausalLM, preset
from torch.export import Dim

from dsc.frontends.export import _Decode, _Prefill
from tests.tolerances import TOL


@pytest.mark.parametrize("name", ["tiny", pytest.param("small", marks=pytest.mark.slow)])  # small: --run-slow
def test_export_reproduces_eager(name, tiny):
    m = tiny if name == "tiny" else DeepseekV32ForCausalLM(preset(name)).init_weights(0).eval()
    B, S, T = Dim("batch", max=64), Dim("seq", max=4096), Dim("ctx", max=8192)
    n = len(m.new_cache(1, 1))
    with torch.no_grad():
        pre = torch.export.export(
            _Prefill(m), (torch.zeros(2, 5, dtype=torch.long), m.new_cache(2, 5)),
            dynamic_shapes=({0: B, 1: S}, [{0: B, 1: S}] * n),
        )  # fmt: skip
        dec = torch.export.export(
            _Decode(m), (torch.zeros(2, 2, dtype=torch.long), torch.tensor([[5, 6]] * 2), m.new_cache(2, 7)),
            dynamic_shapes=({0: B, 1: Dim("new", max=64)}, {0: B, 1: Dim("new", max=64)}, [{0: B, 1: T}] * n),
        )  # fmt: skip
        tokens = torch.randint(0, 256, (3, 24))
        c_eager, c_exp = m.new_cache(3, 32), m.new_cache(3, 32)
        a, _ = m.prefill(tokens[:, :20], [c[:, :20] for c in c_eager])
        b, _ = pre.module()(tokens[:, :20], [c[:, :20] for c in c_exp])
        torch.testing.assert_close(b, a, **TOL["fp32_exact_graph"])
        pos = torch.arange(20, 24).expand(3, 4)
        a, _ = m.decode(tokens[:, 20:], pos, [c[:, :24] for c in c_eager])
        b, _ = dec.module()(tokens[:, 20:], pos, [c[:, :24] for c in c_exp])
        torch.testing.assert_close(b, a, **TOL["fp32_exact_graph"])
    for x, y in zip(c_eager, c_exp):
        torch.testing.assert_close(y, x, **TOL["fp32_exact_graph"])
