import copy
import hashlib
import os

import pytest
import torch
from dsc.model import DeepseekV32ForCausalLM, preset

from dsc.frontends.transformers import bind_installed

bind_installed("kernels")  # pytest puts the repository root on sys.path

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

    with pytest.MonkeyPatch.context() as mp:  # kept for ``capture_once``
        _export_once(mp)
        return capture(tiny, source="tiny")


@pytest.fixture(scope="session")
def tiny_optimized(tiny_program):
    from dsc.pass_manager import run_pipeline, select_passes

    return run_pipeline(tiny_program, select_passes())


_CAPTURES: dict = {}


def _export_once(mp: pytest.MonkeyPatch) -> None:
    """The frontends' torch.export of a model's entries (~10 s a model on 2 cores) done once per
    model in this test process: keyed by the model's class, config, cache spec, export options and
    weights' bytes, so a model that differs in any of them is captured anew. Each call gets its own
    copy (``Program.clone``) with the caller's provenance."""
    from dsc.frontends import export, reference, transformers

    real = export.export_entries

    def once(model, spec, config, provenance, *args, **kwargs):
        h = hashlib.sha1(repr((type(model).__name__, config, spec, args, sorted(kwargs.items()))).encode())
        for k, t in model.state_dict().items():
            h.update(k.encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        key = h.hexdigest()
        if key not in _CAPTURES:
            _CAPTURES[key] = real(model, spec, config, provenance, *args, **kwargs)
        program = _CAPTURES[key].clone()
        program.provenance.update(copy.deepcopy(provenance))
        return program

    for frontend in (reference, transformers):
        mp.setattr(frontend, "export_entries", once)


@pytest.fixture
def capture_once(monkeypatch, tiny_program):
    """The capture stage of ``dsc optimize`` / ``dsc diff`` / ``dsc bench`` from ``_export_once``, for
    tests about what comes after it (the tiny model's is ``tiny_program``'s); the tests of capturing
    itself, and the end-to-end runs, capture for real."""
    _export_once(monkeypatch)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (minutes on 2 cores)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
