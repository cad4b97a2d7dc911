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
