import os

# Triton kernels run on the CPU through the interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Never reach a model hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import random
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _notices_said_again():
    """Each test is a run of its own: what the engine says once per process (pipeline.say_once, the tiny preset's
    random weights) is said again in the next test."""
    pipeline = sys.modules.get("framepack_engine.pipeline")
    if pipeline is not None:
        pipeline.NOTICES_SAID.clear()
    yield


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test: small models on a shared CPU run fastest and steadiest that way (no
    spinning workers). Modules of small-model tests use it for every test (pytestmark)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="GPU-only test: needs CUDA, none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
