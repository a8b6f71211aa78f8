"""benchmarks/gpu_check.py: its help, and its dry run (what a machine without CUDA can check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
CUDA_PARTS = ("parity", "precision", "nccl", "enwik8", "bench", "tests")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_help_names_every_part():
    done = run("--help")
    assert done.returncode == 0
    for part in ("env", *CUDA_PARTS):
        assert part in done.stdout


def test_dry_run_exits_cleanly_names_the_cuda_parts_and_runs_the_cpu_checks(tmp_path):
    done = run(str(tmp_path), "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "needs CUDA: " + ", ".join(CUDA_PARTS) in done.stdout
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["dry_run"]
    parts = summary["parts"]
    assert parts["env"]["status"] == "ok" and parts["parity"]["status"] == "ok"
    items = parts["parity"]["items"]
    assert {(i["policy"], i["backend"]) for i in items} == {
        (p, b) for p in ("expire-span", "transformer-xl", "adaptive-span", "compressive")
        for b in ("sdpa", "flex")}
    assert all(i["verdict"] == "ok" for i in items)
    for part in CUDA_PARTS[1:]:
        assert parts[part] == {"status": "skipped", "reason": "needs CUDA"} or \
            parts[part]["reason"].startswith("needs CUDA")
    assert (tmp_path / "gpu_check.log").read_text().count("needs CUDA") >= len(CUDA_PARTS)
