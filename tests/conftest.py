"""Install the torchvision shim before any test module imports timm (see riformer/_compat.py),
and skip slow tests with a reason unless asked for (`make test-slow`)."""
import riformer  # noqa: F401

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow on 2 CPU cores: run with `make test-slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
