"""Fixtures that run the real petrel-mta binary on loopback.

The MTA binds port 0 and prints the address it got ("listening for SMTP on ADDR"), so
no port is ever guessed. Every helper waits on a condition with a generous deadline;
nothing sleeps to synchronise.
"""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("PETREL_MTA_BIN", ROOT / "target" / "debug" / "petrel-mta"))


def wait_for(condition, timeout=60.0, interval=0.05, what="condition"):
    """Polls `condition` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Mta:
    """One running petrel-mta process."""

    def __init__(self, workdir: Path, config_text: str, env=None):
        self.env = env
        self.workdir = workdir
        self.config_path = workdir / "mta.yaml"
        self.config_path.write_text(config_text)
        self.stdout_lines = []
        self.proc = None
        self.host = None
        self.port = None

    def start(self, timeout=60.0):
        self.stdout_lines = []
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--config", str(self.config_path)],
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / "mta.log", "ab"),
            text=True,
            env={**os.environ, **(self.env or {})},
        )
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.stdout_lines.append(line.rstrip("\n"))
                m = re.search(r"listening for SMTP on (\S+):(\d+)$", line.strip())
                if m and not ready.is_set():
                    self.host, self.port = m.group(1), int(m.group(2))
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout):
            self.kill()
            raise AssertionError(
                f"petrel-mta did not start; log:\n{self.log()}\nstdout: {self.stdout_lines}"
            )
        return self

    def log(self):
        path = self.workdir / "mta.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self):
        """SIGKILL: no chance to clean up."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self):
        """SIGTERM and wait for a clean exit."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout=60)
        return self.proc.returncode if self.proc else None


def config(workdir: Path, extra_domains="", spool=None, **smtpd):
    """A config with one listener on 127.0.0.1:0 and example.test delivered locally."""
    spool = spool or workdir / "spool"
    lines = "\n".join(f"  {k}: {v}" for k, v in smtpd.items())
    return f"""\
hostname: mx.petrel.test
listeners:
  - address: 127.0.0.1:0
smtpd:
  rate_limits: {{messages_per_ip: "off", recipients_per_ip: "off"}}
{lines}
spool:
  path: {spool}
  segment_size: 1048576
admin:
  address: 127.0.0.1:0
queue:
  retry_interval: 1s
  max_retry_interval: 2s
local_domains:
  - name: example.test
    delivery:
      maildir:
        root: {workdir / "maildir"}
{extra_domains}"""


def mta_header(workdir: Path) -> str:
    """The start of most test configs: our host name, one listener and the admin
    endpoint on OS-chosen loopback ports, and a spool in `workdir`."""
    return f"""\
hostname: mx.petrel.test
listeners:
  - address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
spool:
  path: {workdir / "spool"}
"""


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


@pytest.fixture
def mta(workdir):
    server = Mta(workdir, config(workdir)).start()
    yield server
    server.kill()


def maildir_files(root: Path, user: str):
    new = root / user / "new"
    return sorted(new.iterdir()) if new.exists() else []


def strip_received(data: bytes) -> bytes:
    """Removes the Return-Path: and Received: headers petrel-mta prepends."""
    assert data.startswith(b"Return-Path: <"), data[:80]
    lines = data.split(b"\r\n")
    assert lines[1].startswith(b"Received: "), data[:200]
    i = 2
    while i < len(lines) and lines[i][:1] in (b"\t", b" "):
        i += 1
    return b"\r\n".join(lines[i:])


@pytest.fixture(scope="session")
def kube():
    """The live Kubernetes cluster of e2e/operator/ (live.py says which one, and how)."""
    import sys
    sys.path.insert(0, str(ROOT / "e2e" / "operator"))
    from live import cluster
    yield from cluster()
