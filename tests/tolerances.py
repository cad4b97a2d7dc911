"""The tests' view of the one tolerance table (``dsc.verify.TOLERANCES``): (atol, rtol) per comparison kind."""

from dsc.verify import SQNR_FLOORS_DB, TOLERANCES

TOL = {
    "fp32_reassoc": TOLERANCES["fp32_reassoc"].close(),
    "fp32_exact_graph": TOLERANCES["exact"].close(),
    "fp32_rewrite": TOLERANCES["fp32_rewrite"].close(),
}
SQNR_DB = SQNR_FLOORS_DB
