"""The one table of numerical tolerances used by the tests: (atol, rtol) per comparison kind."""

TOL = {
    # same math, different fp32 association (einsum vs loops, cache vs full sequence)
    "fp32_reassoc": dict(atol=2e-5, rtol=1e-4),
    # an exported / compiled program against eager on the same graph
    "fp32_exact_graph": dict(atol=1e-6, rtol=1e-5),
    # a rewritten program (different contraction order over large sums) against the naive one
    "fp32_rewrite": dict(atol=1e-4, rtol=1e-3),
}

# lossy numerics are judged by SQNR floors (dB)
SQNR_DB = {"fp8_weight_dequant": 25.0}
