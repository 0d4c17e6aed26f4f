import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (parallel_cases, train_helpers)


@pytest.fixture(scope="session")
def gloo_pool():
    """Four gloo processes kept alive for the whole session (no spawn per example)."""
    from neva.testing import GlooPool
    pool = GlooPool(4)
    yield pool
    pool.close()
