"""The service process stays small: importing it and building the app loads no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_app_import_leaves_torch_out(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import service.main\n"
        "from fastapi.testclient import TestClient\n"
        "with TestClient(service.main.create_app()) as c:\n"
        "    assert c.get('/readyz').status_code == 200\n"
        "    assert c.get('/openapi.json').status_code == 200\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'fgd_core', 'ray') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    env = {**os.environ, "FGD_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "service" / "jobs.db").exists()  # default store, migrated at start-up
