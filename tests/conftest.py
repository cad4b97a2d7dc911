import pytest
import torch
from dsc.model import DeepseekV32ForCausalLM, preset


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
