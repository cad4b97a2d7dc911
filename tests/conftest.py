import os

import pytest
import torch
from dsc.model import DeepseekV32ForCausalLM, preset

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: the workers share the cores
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny():
    return DeepseekV32ForCausalLM(preset("tiny")).init_weights(0).eval()


@pytest.fixture(scope="session")
def tiny_cfg():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_program(tiny):
    from dsc.frontends.reference import capture

    return capture(tiny, source="tiny")


@pytest.fixture(scope="session")
def tiny_optimized(tiny_program):
    from dsc.pass_manager import run_pipeline, select_passes

    return run_pipeline(tiny_program, select_passes())


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (minutes on 2 cores)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
