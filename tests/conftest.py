import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (parallel_cases, train_helpers)
CACHES = ("__pycache__", ".pytest_cache", ".hypothesis")   # what Python and the test tools keep by themselves
_BEFORE = pytest.StashKey[set]()


@pytest.fixture(scope="session")
def gloo_pool():
    """Four gloo processes kept alive for the whole session (no spawn per example)."""
    from neva.testing import GlooPool
    pool = GlooPool(4)
    yield pool
    pool.close()


@pytest.fixture()
def job(tmp_path, monkeypatch):
    """The main job (experiments/siglip_mixtral.py) started from an empty folder with its synthetic
    dataset shrunk to 40 images and 8 clips: what it writes (data/synthetic/, runs/) stays in tmp_path."""
    if str(ROOT / "experiments") not in sys.path:
        sys.path.insert(0, str(ROOT / "experiments"))
    import siglip_mixtral
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(siglip_mixtral, "GENERATE", dict(siglip_mixtral.GENERATE, train_images=40, eval_images=3,
                                                         train_videos=8, eval_videos=4))
    return siglip_mixtral


# ------------------------------------------------------------------ the suite leaves the checkout as it found it
def checkout_state() -> set[str] | None:
    """``git status --porcelain --ignored`` of the checkout (ignored outputs such as data/ and runs/
    included), less the caches; None outside a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return {line for line in out.stdout.splitlines() if not any(c in line for c in CACHES)}


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = checkout_state()


def pytest_sessionfinish(session, exitstatus):
    before, after = session.config.stash.get(_BEFORE, None), checkout_state()
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = ("the tests wrote into the checkout (write under tmp_path instead; `git status --porcelain "
               "--ignored` shows):\n  " + "\n  ".join(new))
        if tr is not None:
            tr.write_line(msg, red=True, bold=True)
        else:
            print(msg, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
