"""Test-wide settings: no network (the hubs are unreachable here and in CI), a private data cache."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

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
