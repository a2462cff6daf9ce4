"""Shared test fixtures: the tiny offline world, built once per test session in a temporary folder."""

import os

import pytest

# One thread in the test process, as in the commands the tests start (their environment sets it too): results
# compared bit for bit between the two come from the same float summation order.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite runs on the CPU, on a GPU machine too (a test that means a GPU says so): otherwise train.main without
# --device would run on CUDA in bf16, and a 2-rank torchrun would bind cuda:1.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import tiny


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """tiny.build_tiny_world's paths, plus `small` (16 synthetic pairs), `cache` (a datasets cache) and `root`."""
    root = tmp_path_factory.mktemp("world")
    paths = tiny.build_tiny_world(str(root / "tiny_world"))
    small = root / "small.jsonl"
    with open(paths["train"]) as src, open(small, "w") as dst:
        for _ in range(16):
            dst.write(src.readline())
    return {**paths, "small": str(small), "cache": str(root / "cache"), "root": root}


@pytest.fixture(scope="module")
def policy(world):
    """The tiny world's SFT model (built once per session, shared with train.py's default run): the policy of the
    onpolicy.py and generate.py tests."""
    import torch.distributed as dist

    import train
    import utils
    owner = not dist.is_initialized()
    utils.init_distributed("cpu")
    try:
        return tiny.sft_model(os.path.dirname(world["data"]), world, train.main, cache_dir=world["cache"])
    finally:
        if owner:
            dist.destroy_process_group()
