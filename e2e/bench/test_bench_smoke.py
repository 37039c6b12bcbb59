"""Keeps the benchmark harness from rotting: `run.py --smoke` against the real binary.

Asserts only that the harness completed and printed its table; never any timing.
Binary: $PETREL_MTA_BIN, else target/release/petrel-mta, else target/debug/petrel-mta.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def binary() -> Path:
    env = os.environ.get("PETREL_MTA_BIN")
    if env:
        return Path(env)
    release = ROOT / "target" / "release" / "petrel-mta"
    return release if release.exists() else ROOT / "target" / "debug" / "petrel-mta"


def test_bench_smoke_run_completes_and_prints_the_table(tmp_path):
    mta = binary()
    if not mta.exists():
        pytest.skip(f"{mta} not built (cargo build -p mta)")
    if not (shutil.which("smtp-source") or Path("/usr/sbin/smtp-source").exists()):
        pytest.skip("smtp-source/smtp-sink not installed (Debian package postfix)")
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "run.py"), "--smoke", "--bin", str(mta),
         "--json", str(out_json), "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    assert "| line | msg/s min / median / max |" in proc.stdout, report
    assert "| ceiling (smtp-source -> smtp-sink) |" in proc.stdout, report
    assert "| Petrel accept (held) |" in proc.stdout, report
    assert out_json.exists(), report
    # Nothing of ours may outlive the run.
    assert not list(tmp_path.glob("petrel-bench-*")), report
