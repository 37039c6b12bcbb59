"""Keeps the benchmark harness from rotting: `run.py --smoke` against the real binary.

Asserts only that the harness completed and printed its tables; never any timing.
Binary: $PETREL_MTA_BIN, else target/release/petrel-mta, else target/debug/petrel-mta.
Baseline for the queue stage's before/after rows: $PETREL_BASELINE_BIN, else the same
binary (the comparison is exercised either way).
"""

import json
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


def prerequisites() -> Path:
    mta = binary()
    if not mta.exists():
        pytest.skip(f"{mta} not built (cargo build -p mta)")
    if not (shutil.which("smtp-source") or Path("/usr/sbin/smtp-source").exists()):
        pytest.skip("smtp-source/smtp-sink not installed (Debian package postfix)")
    return mta


def run_bench(tmp_path, *args, env=None) -> tuple[subprocess.CompletedProcess, str]:
    proc = subprocess.run(
        [sys.executable, str(HERE / "run.py"), *args, "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    return proc, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"


QUEUE_HEADER = "| queued | binary | enqueue msg/s | RSS MiB idle -> queued | RSS B / queued msg |"
QUEUE_FIGURES = ("rss_bytes_per_queued_msg", "peak_rss_enqueue_mib", "restart_to_greeting_s",
                 "restart_to_recovered_line_s", "peak_rss_restart_mib", "flush_msgs_per_s",
                 "peak_rss_flush_mib")


def test_bench_smoke_run_completes_and_prints_the_table(tmp_path):
    mta = prerequisites()
    out_json = tmp_path / "bench.json"
    env = dict(os.environ)
    env.pop("PETREL_BASELINE_BIN", None)  # the "after" rows alone; the next test compares
    proc, report = run_bench(tmp_path, "--smoke", "--bin", str(mta), "--json", str(out_json),
                             env=env)
    assert proc.returncode == 0, report
    assert "| line | msg/s min / median / max |" in proc.stdout, report
    assert "| ceiling (smtp-source -> smtp-sink) |" in proc.stdout, report
    assert "| Petrel accept (held) |" in proc.stdout, report
    assert QUEUE_HEADER in proc.stdout, report
    assert "| 300 | after |" in proc.stdout, report
    assert "| before (" not in proc.stdout, report
    assert out_json.exists(), report
    sizes = json.loads(out_json.read_text())["queue_scaling"]["sizes"]
    assert [(e["queued"], e["binary"]) for e in sizes] == [(300, "after"), (1000, "after")]
    for e in sizes:
        assert e["message_bytes"] == 2000, e
        for key in QUEUE_FIGURES:
            assert key in e, (key, e)
    # Nothing of ours may outlive the run.
    assert not list(tmp_path.glob("petrel-bench-*")), report


def test_bench_queue_stage_compares_a_baseline(tmp_path):
    mta = prerequisites()
    baseline = Path(os.environ.get("PETREL_BASELINE_BIN") or mta)
    if not baseline.exists():
        pytest.skip(f"PETREL_BASELINE_BIN {baseline} does not exist")
    out_json = tmp_path / "bench.json"
    proc, report = run_bench(tmp_path, "--only", "queue", "--queue-sizes", "300",
                             "--bin", str(mta), "--baseline-binary", str(baseline),
                             "--json", str(out_json))
    assert proc.returncode == 0, report
    assert QUEUE_HEADER in proc.stdout, report
    assert "| 300 | before (" in proc.stdout, report
    assert "| 300 | after |" in proc.stdout, report
    assert "300 queued, before -> after: peak RSS" in proc.stdout, report
    q = json.loads(out_json.read_text())["queue_scaling"]
    assert [(e["queued"], e["binary"]) for e in q["sizes"]] == [(300, "before"), (300, "after")]
    for e in q["sizes"]:
        for key in QUEUE_FIGURES:
            assert key in e, (key, e)
    assert not list(tmp_path.glob("petrel-bench-*")), report
