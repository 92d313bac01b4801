import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def cluster(tmp_path):
    from daemons import DaemonCluster
    with DaemonCluster(tmp_path) as c:
        yield c
