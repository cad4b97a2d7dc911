import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from dsc.model import DeepseekV32ForCausalLM, preset


def _bind_installed(name: str) -> None:
    """pytest puts the repository root on sys.path, where dsc's source folders (kernels/, model/,
    passes/, export/) would shadow installed packages of the same name: transformers (5.2x+) imports
    Hugging Face's ``kernels`` when it is installed, its own dependency. Bind the name to the
    installed package before anything imports it."""
    root = Path(__file__).resolve().parents[1]
    if name in sys.modules:
        return
    path = [p for p in sys.path if p and Path(p).resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_bind_installed("kernels")

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
