"""The worker honours ``dedup.enabled``: switched off, its dedup agent never loads the
embedding model (nor torch), and its candidates pass as samples without an embedding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.agents.pipeline_util import REPO_ROOT

BUILD = """
import sys
from sluice.settings import load_settings
from agents.worker import build_worker
settings = load_settings(state_dir=sys.argv[1], dedup={"enabled": sys.argv[2] == "on"})
app = build_worker(settings, ["dedup", "balance"])
heavy = sorted(m for m in ("torch", "sentence_transformers", "onnxruntime") if m in sys.modules)
print("heavy:" + ",".join(heavy))
"""


def test_a_worker_without_semantic_dedup_never_loads_the_model(tmp_path: Path) -> None:
    # A fresh interpreter: the test process itself may have imported torch already.
    # Building the app connects to nothing (Faust and redis-py connect when run).
    done = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path), "off"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "heavy:"
