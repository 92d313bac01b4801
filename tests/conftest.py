import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def cluster(tmp_path):
    from daemons import DaemonCluster
    with DaemonCluster(tmp_path) as c:
        yield c


@pytest.fixture
def netlab():
    """The NAT testbed of network namespaces (tests/netlab.py), torn down also on failure;
    skips with the reason where the machine cannot build it (not root, no iproute2/iptables)."""
    from netlab import NetLab, unavailable_reason
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with NetLab() as lab:
        yield lab


# The testbed's tests (real daemons in network namespaces, hole punching): `-m netlab`
# runs just them, `-m "not netlab"` everything else.
NETLAB_MODULES = {"test_netlab.py", "test_nat_jobs.py", "test_dht_lab.py", "test_reachability_lab.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in NETLAB_MODULES:
            item.add_marker(pytest.mark.netlab)
