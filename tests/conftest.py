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
    group_by_param(items)
    for item in items:
        if "slurm" in item.keywords and not config.getoption("--runslurm"):
            item.add_marker(skip_slurm)
            continue
        if "learning" in item.keywords and not config.getoption("--runlearning"):
            item.add_marker(skip_learning)
        elif "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


def group_by_param(items):
    """In a module that sets GROUP_BY_PARAM (a parameter's name), run the tests of one value together,
    in the order the values first appear, each value's tests in their order: a module that builds big
    models then builds each once and holds one at a time (tests/test_timm_contract.py)."""
    def value(item):
        module = getattr(item, "module", None)
        param = getattr(module, "GROUP_BY_PARAM", None)
        callspec = getattr(item, "callspec", None)
        return (module, callspec.params[param]) if param and callspec and param in callspec.params else None

    first = {}
    for index, item in enumerate(items):
        first.setdefault(value(item) or id(item), index)
    items[:] = [item for _, item in sorted(enumerate(items),
                                            key=lambda pair: (first[value(pair[1]) or id(pair[1])], pair[0]))]
