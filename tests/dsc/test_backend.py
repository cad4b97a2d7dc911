import logging

import torch

import dsc.backend  # noqa: F401  (registers backend="dsc")
from tests.tolerances import TOL


def test_torch_compile_dsc_backend_matches_eager(tiny, caplog):
    caplog.set_level(logging.INFO, logger="dsc.backend")
    torch._dynamo.reset()
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        ref, _ = tiny.prefill(tokens, tiny.new_cache(2, 20))
        compiled = torch.compile(tiny.prefill, backend="dsc")
        c = tiny.new_cache(2, 20)
        got, _ = compiled(tokens, c)
    torch.testing.assert_close(got, ref, **TOL["fp32_reassoc"])
    assert c[0].abs().sum() > 0  # the cache writes happened
    ran = [r for r in caplog.records if r.name == "dsc.backend"]
    assert ran and "'fuse_add_rms_norm': 4" in ran[0].getMessage()  # the passes ran on the Dynamo graph
