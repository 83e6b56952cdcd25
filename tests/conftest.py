"""Test-wide settings: no network (the hubs are unreachable here and in CI), a private data cache."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
if "PYTEST_XDIST_WORKER" in os.environ:
    # the suite runs in one worker per core (pyproject.toml: -n auto): each worker's torch, and every process
    # it starts, on one thread, so that two workers never fight over the same cores (on 2 cores, two 2-thread
    # processes stall each other's parallel regions; 1 and 2 threads take the same time at the tests' sizes)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    # corpora and tokenizers built by the tests go to a fresh folder, never the user's ~/.cache,
    # so every run builds them from the packages exactly as a new machine would
    if "MINISTACKS_TEST_CACHE" in os.environ:  # opt-in reuse between local runs
        os.environ["MINISTACKS_CACHE"] = os.environ["MINISTACKS_TEST_CACHE"]
    else:
        os.environ["MINISTACKS_CACHE"] = str(tmp_path_factory.mktemp("ministacks-cache"))
    yield


@pytest.fixture
def varying_reward(monkeypatch):
    """Every domain's RL reward replaced by one that differs within a group (an even-length reply earns 1): the
    tests' random and smoke models never earn math's, and a GRPO step whose groups' rewards are all equal makes
    no update."""
    monkeypatch.setattr("ministacks.rl.loop.reward_for", lambda domain: lambda prompt, reply, ex: float(len(reply) % 2 == 0))
