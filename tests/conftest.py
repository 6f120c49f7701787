"""Install the torchvision shim before any test module imports timm (see riformer/_compat.py),
and skip slow tests with a reason unless asked for (`make test-slow`)."""
import riformer  # noqa: F401

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption("--runlearning", action="store_true",
                     help="also run the learning check (tests marked learning; minutes, its own CI step)")
    parser.addoption("--runslurm", action="store_true",
                     help="also run the cluster test on a one-node SLURM it starts (tests marked slurm; root, "
                          "scripts/slurm_local.sh; its own CI step)")


def pytest_collection_modifyitems(config, items):
    skip_learning = pytest.mark.skip(reason="the learning check takes minutes: run with "
                                            "`python -m pytest -q -m learning --runlearning`")
    skip_slow = pytest.mark.skip(reason="slow on 2 CPU cores: run with `make test-slow`")
    skip_slurm = pytest.mark.skip(reason="starts a SLURM cluster on this machine (root, apt-get): run with "
                                         "`python -m pytest -q -m slurm --runslurm`")
    for item in items:
        if "slurm" in item.keywords and not config.getoption("--runslurm"):
            item.add_marker(skip_slurm)
            continue
        if "learning" in item.keywords and not config.getoption("--runlearning"):
            item.add_marker(skip_learning)
        elif "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
