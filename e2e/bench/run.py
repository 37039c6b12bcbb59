#!/usr/bin/env python3
"""Petrel benchmark harness: Petrel against Postfix, in one run, on this machine (issue 7).

    python3 e2e/bench/run.py [--messages N] [--sessions S] [--size BYTES] [--runs R]
                             [--json out.json] [--smoke]
    python3 e2e/bench/run.py --only queue --queue-sizes 10000,100000,1000000 \
                             [--baseline-binary /tmp/petrel-before/petrel-mta]

Lines measured, all on 127.0.0.1 with the same message count, sessions and size:

  ceiling         smtp-source -> smtp-sink (nothing beats this on this box)
  postfix accept  smtp-source -> a throwaway Postfix instance, messages held in its queue
  postfix relay   smtp-source -> Postfix -> smtp-sink, timed until the sink counted them all
  petrel accept   smtp-source -> petrel-mta, messages held (queue.hold_all)
  petrel relay    smtp-source -> petrel-mta -> smtp-sink, timed like Postfix relay

How each number is obtained:

* messages/s: N / wall time of smtp-source (accept lines), or N / time from the start of
  smtp-source until smtp-sink's counter reached N (relay lines). One connection per message
  (smtp-source's default). min/median/max over R runs; every run uses a fresh server.
* p50/p99 accept latency: smtp-source reports no per-message times, so a separate pass
  with our own asyncio SMTP client (same sessions and size, one connection per message,
  --latency-messages messages) records the time from writing the final ".<CRLF>" to
  reading the 250 reply. The load in that pass is what our Python client can generate,
  which on a 2-core box is usually less than smtp-source's; the latency is therefore that
  of a server under load from S concurrent sessions, not at its saturation rate.
* CPU s per 1,000 messages: utime+stime from /proc/<pid>/stat of the server processes over
  the run. Petrel: the petrel-mta process (all threads). Postfix: every process of the
  instance (master plus its children, found by MAIL_CONFIG in their environment), plus
  the master's cutime+cstime, which holds the CPU of children that exited during the run.
  Ceiling: the smtp-sink process.
* Peak RSS: petrel-mta's VmHWM; for Postfix the largest sum of VmRSS over its processes,
  sampled every 0.25 s during the run. Peak PSS (from smaps_rollup, sampled the same way)
  is reported for both, since Postfix's processes share most of their pages.

Also measured: memory per idle post-EHLO connection against petrel-mta, and queue scaling
(--queue-sizes, 10k and 100k by default; --only queue runs it alone). Per size, N held
messages of --queue-message-size bytes (2,000) are enqueued with smtp-source, then:

* RSS bytes per queued message: (VmRSS after enqueue - VmRSS of the idle process) / N;
  peak RSS is petrel-mta's VmHWM after enqueue, after the restart's recovery, and during
  the flush (VmHWM reset with clear_refs just before it).
* restart: from spawning petrel-mta on the same spool until a connection gets its 220
  greeting (polled), and until a line saying "recovered" appears (stdout, else its log),
  for a binary that recovers in the background.
* flush: N / time from `queue release --all` until smtp-sink counted all N.

--baseline-binary (env PETREL_BASELINE_BIN) measures a second petrel-mta, "before", at
every size of the same run, alternating with --binary ("after"); --baseline-only measures
it alone. Each size's directory is removed before the next (a million 2 KB messages take
about 2.5 GB per binary). Only the standard library is used. Servers and child processes
are always stopped, and temporary directories removed, even on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Skip(Exception):
    """A stage that cannot run here; the reason is printed, and it is not a failure."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_binary() -> Path:
    env = os.environ.get("PETREL_MTA_BIN")
    if env:
        return Path(env)
    release = ROOT / "target" / "release" / "petrel-mta"
    return release if release.exists() else ROOT / "target" / "debug" / "petrel-mta"


def free_port() -> int:
    """A port the OS picks for us on 127.0.0.1 (for programs that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_port(port: int, timeout: float = 30.0, host: str = HOST) -> None:
    def ok():
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False

    wait_until(ok, timeout, f"a listener on {host}:{port}", interval=0.05)


# --------------------------------------------------------------------------------------
# Child processes: every one is registered so that cleanup can always stop it.


class Children:
    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.cleanups: list = []  # callables, run last-in first-out
        self.lock = threading.Lock()

    def popen(self, argv, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kw)
        with self.lock:
            self.procs.append(proc)
        return proc

    def on_cleanup(self, fn):
        with self.lock:
            self.cleanups.append(fn)
        return fn

    def forget(self, fn):
        with self.lock:
            if fn in self.cleanups:
                self.cleanups.remove(fn)

    def cleanup(self):
        with self.lock:
            cleanups, self.cleanups = self.cleanups[::-1], []
            procs, self.procs = self.procs, []
        for fn in cleanups:
            try:
                fn()
            except Exception as e:  # keep cleaning up
                log(f"cleanup step failed: {e}")
        for proc in procs:
            stop_proc(proc)


CHILDREN = Children()


def stop_proc(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------
# /proc accounting


def proc_stat(pid: int):
    """(utime+stime, cutime+cstime) in seconds, or None if the process is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14 -> index 11.
    ut, st, cut, cst = (int(x) for x in fields[11:15])
    return (ut + st) / CLK_TCK, (cut + cst) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pids_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment holds key=value (how a Postfix instance is found)."""
    needle = f"{key}={value}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if (b"\0" + env).find(b"\0" + needle) >= 0:
            found.append(int(entry))
    return found


class ProcGroup:
    """The processes of one server under test; CPU and memory are summed over them."""

    def __init__(self, pids_fn, reaper_pid_fn=None):
        self.pids_fn = pids_fn
        self.reaper_pid_fn = reaper_pid_fn  # its cutime/cstime counts exited children

    def cpu(self) -> float:
        total = 0.0
        reaper = self.reaper_pid_fn() if self.reaper_pid_fn else None
        for pid in self.pids_fn():
            st = proc_stat(pid)
            if st is None:
                continue
            total += st[0]
            if pid == reaper:
                total += st[1]
        return total

    def memory(self) -> tuple[int, int, int]:
        """(sum VmRSS KiB, sum PSS KiB, process count)."""
        rss = pss = n = 0
        for pid in self.pids_fn():
            r = proc_status_kib(pid, "VmRSS")
            if r is None:
                continue
            rss += r
            pss += proc_pss_kib(pid)
            n += 1
        return rss, pss, n


class Sampler:
    """Samples a ProcGroup's memory in a thread while a run is in progress."""

    def __init__(self, group: ProcGroup, interval: float = 0.25):
        self.group = group
        self.interval = interval
        self.peak_rss = self.peak_pss = self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self):
        rss, pss, n = self.group.memory()
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, n)

    def _loop(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample()


# --------------------------------------------------------------------------------------
# Postfix's test programs


class Sink:
    """smtp-sink on an OS-chosen port, counting the messages it received (-c)."""

    def __init__(self, workdir: Path, count: bool = True, port: int | None = None):
        """count=False leaves out -c (its per-message counter writes cost the sink CPU).
        port: listen there (one chosen earlier and left closed until now) instead of a
        new OS-chosen port."""
        self.port = port or free_port()
        self.count = 0
        self._cond = threading.Condition()
        argv = [SMTP_SINK] + (["-c"] if count else [])
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += [f"{HOST}:{self.port}", "1024"]
        self.proc = CHILDREN.popen(
            argv,
            stdout=subprocess.PIPE if count else subprocess.DEVNULL,
            stderr=open(workdir / f"smtp-sink-{self.port}.log", "ab"),
            cwd=workdir,
        )
        if count:
            threading.Thread(target=self._pump, daemon=True).start()
        wait_port(self.port)

    def _pump(self):
        pattern = re.compile(rb"mesg=(\d+)")
        pending = b""
        while True:
            chunk = self.proc.stdout.read1(1 << 20)
            if not chunk:
                return
            time.sleep(0.02)  # let counter updates pile up: parse them in bulk
            pending += chunk
            parts = re.split(rb"[\r\n]", pending)
            pending = parts.pop()
            for part in reversed(parts):
                m = pattern.search(part)
                if m:
                    with self._cond:
                        self.count = max(self.count, int(m.group(1)))
                        self._cond.notify_all()
                    break

    def wait_count(self, target: int, timeout: float) -> float:
        """Blocks until the counter reaches target; returns the monotonic time it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < target:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(
                        f"smtp-sink counted {self.count} of {target} messages before "
                        + ("it exited" if self.proc.poll() is not None else f"{timeout:.0f}s")
                    )
                self._cond.wait(min(left, 0.5))
            return time.monotonic()

    def group(self) -> ProcGroup:
        return ProcGroup(lambda: [self.proc.pid])

    def stop(self):
        stop_proc(self.proc)


def run_source(port: int, args, messages: int, rcpt: str, timeout: float,
               size: int | None = None) -> float:
    """smtp-source with S sessions, one connection per message, `size` payload bytes
    (default --size); returns its wall time."""
    argv = [
        SMTP_SOURCE,
        "-s", str(args.sessions),
        "-m", str(messages),
        "-l", str(args.size if size is None else size),
        "-M", "client.bench.test",
        "-f", "sender@client.bench.test",
        "-t", rcpt,
        "-S", "petrel bench",
        f"{HOST}:{port}",
    ]
    start = time.monotonic()
    proc = CHILDREN.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_proc(proc)
        raise RuntimeError(f"smtp-source did not finish {messages} messages in {timeout:.0f}s")
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"smtp-source exited {proc.returncode}: {(err or out).decode(errors='replace')[-500:]}"
        )
    return elapsed


def source_timeout(messages: int) -> float:
    return 120.0 + messages / 50.0  # generous: 50 msg/s would be a broken server


# --------------------------------------------------------------------------------------
# Our own SMTP client, for per-message accept latency and idle connections


def message_bytes(size: int, seq: int) -> bytes:
    head = (
        f"From: <sender@client.bench.test>\r\nTo: <user@example.test>\r\n"
        f"Subject: petrel bench {seq}\r\nMessage-ID: <{seq}.{time.time_ns()}@client.bench.test>\r\n\r\n"
    ).encode()
    line = b"x" * 78 + b"\r\n"
    body = line * (size // len(line))
    rest = size - len(body)
    if rest >= 3:
        body += b"y" * (rest - 2) + b"\r\n"
    return head + body


async def read_reply(reader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


async def one_message(port: int, rcpt: str, data: bytes) -> float:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:

        async def cmd(line: bytes, expect: int) -> None:
            writer.write(line)
            code, text = await read_reply(reader)
            if code != expect:
                raise RuntimeError(f"{line.strip()!r} -> {text.strip()!r}")

        code, text = await read_reply(reader)
        if code != 220:
            raise RuntimeError(f"greeting {text!r}")
        await cmd(b"EHLO client.bench.test\r\n", 250)
        await cmd(b"MAIL FROM:<sender@client.bench.test>\r\n", 250)
        await cmd(f"RCPT TO:<{rcpt}>\r\n".encode(), 250)
        await cmd(b"DATA\r\n", 354)
        writer.write(data)
        await writer.drain()
        t0 = time.perf_counter()
        writer.write(b".\r\n")
        code, text = await read_reply(reader)
        latency = time.perf_counter() - t0
        if code != 250:
            raise RuntimeError(f"end of data -> {text.strip()!r}")
        writer.write(b"QUIT\r\n")
        try:
            await asyncio.wait_for(read_reply(reader), 10)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        return latency
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def latency_pass_async(port, rcpt, messages, sessions, size, timeout):
    data = message_bytes(size, 0)
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(messages))

    async def worker():
        for _ in counter:
            try:
                latencies.append(await asyncio.wait_for(one_message(port, rcpt, data), 60))
            except Exception as e:  # record and go on; reported below
                errors.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(sessions))), timeout)
    return latencies, errors, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency_pass(port: int, rcpt: str, args) -> dict:
    n = args.latency_messages
    lat, errors, elapsed = asyncio.run(
        latency_pass_async(port, rcpt, n, args.sessions, args.size, source_timeout(n))
    )
    if errors and len(errors) > n // 100:
        raise RuntimeError(f"latency client: {len(errors)} of {n} messages failed, e.g. {errors[0]}")
    return {
        "messages": n,
        "sessions": args.sessions,
        "ok": len(lat),
        "failed": len(errors),
        "client_msgs_per_s": round(len(lat) / elapsed, 1),
        "p50_ms": round(percentile(lat, 0.50) * 1000, 3),
        "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
        "max_ms": round(max(lat) * 1000, 3) if lat else None,
    }


# --------------------------------------------------------------------------------------
# Postfix: a throwaway instance under a temporary directory


def traversable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def postfix_parent(workdir: Path) -> Path:
    """A directory Postfix's unprivileged processes can reach: workdir when every ancestor
    lets others through, else a fresh directory under /var/tmp or /tmp."""
    if traversable_by_others(workdir):
        return workdir
    for base in (Path("/var/tmp"), Path("/tmp")):
        if base.is_dir() and traversable_by_others(base):
            d = Path(tempfile.mkdtemp(prefix="petrel-bench-postfix-", dir=base))
            os.chmod(d, 0o755)
            CHILDREN.on_cleanup(lambda: shutil.rmtree(d, ignore_errors=True))
            return d
    raise Skip(f"no directory Postfix's processes can reach ({workdir} is private)")


class Postfix:
    def __init__(self, workdir: Path, mode: str, relay_port: int | None = None,
                 host: str = HOST, relay_host: str = HOST, main_cf: tuple[str, ...] = ()):
        """mode: 'accept' (messages held), 'relay' (relayhost = relay_host:relay_port), or
        'peer' (nothing added: main_cf says what it does). main_cf lines come last, so they
        override the defaults. The e2e suite uses this class for Postfix as a real peer."""
        self.dir = postfix_parent(workdir) / f"postfix-{mode}-{time.monotonic_ns()}"
        self.etc = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.host = host
        self.port = free_port()
        self.mode = mode
        self.etc.mkdir(parents=True)
        self.data.mkdir()
        self.queue.mkdir()
        # Postfix's unprivileged processes must be able to reach their queue directory.
        os.chmod(self.dir, 0o755)
        os.chmod(self.etc, 0o755)
        shutil.chown(self.data, "postfix")
        main = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {self.data}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "myhostname = mx.postfix.bench.test",
            "mydomain = postfix.bench.test",
            "mydestination =",
            "inet_interfaces = 127.0.0.1",  # binds nothing itself: master.cf names the address
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "alias_maps =",
            "alias_database =",
            "local_recipient_maps =",
            "biff = no",
            "smtp_tls_security_level = none",
            "smtpd_tls_security_level = none",
            f"maillog_file = {self.dir}/maillog",
            f"maillog_file_prefixes = {self.dir}",
        ]
        if mode == "accept":
            main.append("smtpd_end_of_data_restrictions = check_client_access static:HOLD")
        elif mode == "relay":
            main.append(f"relayhost = [{relay_host}]:{relay_port}")
        main.extend(main_cf)
        (self.etc / "main.cf").write_text("\n".join(main) + "\n")
        (self.etc / "master.cf").write_text(self._master_cf())
        self.master_pid: int | None = None
        self._cleanup = CHILDREN.on_cleanup(self.stop)

    def _master_cf(self) -> str:
        """Debian's master.cf with chroot off and smtpd on our loopback port."""
        src = Path("/etc/postfix/master.cf")
        text = src.read_text() if src.exists() else ""
        out = []
        seen_smtpd = False
        for line in text.splitlines():
            if not line or line[0] in "# \t":
                out.append(line)
                continue
            cols = line.split()
            if len(cols) >= 8:
                cols[4] = "n"  # no chroot: the instance has no chroot jail set up
                if cols[0] == "smtp" and cols[1] == "inet":
                    cols[0] = f"{self.host}:{self.port}"
                    seen_smtpd = True
                line = " ".join(cols[:8]) + (" " + " ".join(cols[8:]) if cols[8:] else "")
            out.append(line)
        if not seen_smtpd:
            raise Skip("no smtpd inet service in /etc/postfix/master.cf")
        return "\n".join(out) + "\n"

    def _postfix(self, *cmd: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        env = dict(os.environ, MAIL_CONFIG=str(self.etc))
        return subprocess.run(
            [POSTFIX, "-c", str(self.etc), *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def start(self) -> "Postfix":
        res = self._postfix("start")
        if res.returncode != 0:
            try:
                maillog = (self.dir / "maillog").read_text(errors="replace")[-600:]
            except OSError:
                maillog = ""
            raise RuntimeError(f"postfix start failed: {res.stdout}{res.stderr}{maillog}".strip())
        pidfile = self.queue / "pid" / "master.pid"

        def master():
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return None
            return pid if Path(f"/proc/{pid}").exists() else None

        self.master_pid = wait_until(master, 30, "the Postfix master pid file")
        wait_port(self.port, host=self.host)
        return self

    def pids(self) -> list[int]:
        return pids_with_env("MAIL_CONFIG", str(self.etc))

    def group(self) -> ProcGroup:
        return ProcGroup(self.pids, lambda: self.master_pid)

    def count_queue(self, name: str) -> int:
        total = 0
        for _, _, files in os.walk(self.queue / name):
            total += len(files)
        return total

    def stop(self) -> None:
        CHILDREN.forget(self._cleanup)
        try:
            if self.master_pid:
                self._postfix("stop", timeout=60)
                wait_until(lambda: not self.pids(), 30, "Postfix to stop", interval=0.1)
        except Exception as e:
            log(f"postfix stop: {e}; killing its processes")
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            wait_until(lambda: not self.pids(), 10, "Postfix processes to exit", interval=0.1)
        except RuntimeError as e:
            log(str(e))
        # The directory goes when the harness ends: unlinking tens of thousands of queue
        # files between runs would load the disk's journal while the next run measures.


def tools_missing() -> str | None:
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            return f"{Path(tool).name} not found (Debian package postfix)"
    return None


def postfix_available() -> str | None:
    """None when a throwaway Postfix can run, else the reason it cannot."""
    if tools_missing():
        return tools_missing()
    if os.geteuid() != 0:
        return "not running as root"
    if not (Path(POSTFIX).exists() and Path("/usr/lib/postfix/sbin/master").exists()):
        return "Postfix is not installed"
    try:
        import pwd

        pwd.getpwnam("postfix")
    except KeyError:
        return "no postfix user"
    return None


# --------------------------------------------------------------------------------------
# petrel-mta


class Petrel:
    def __init__(self, binary: Path, workdir: Path, config_text: str, name: str = "petrel"):
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / f"{name}.yaml"
        self.config.write_text(config_text)
        self.logfile = self.dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.stdout: list[str] = []
        self.stdout_at: list[float] = []  # monotonic time each stdout line was read
        self.spawned_at = 0.0
        self._ready = threading.Event()

    def spawn(self) -> "Petrel":
        """Starts the process without waiting for it; spawned_at is taken just before."""
        self.stdout, self.stdout_at = [], []
        self.port = None
        self._ready = threading.Event()
        self.spawned_at = time.monotonic()
        self.proc = CHILDREN.popen(
            [str(self.binary), "serve", "--config", str(self.config)],
            cwd=self.dir,
            stdout=subprocess.PIPE,
            stderr=open(self.logfile, "ab"),
            text=True,
        )
        proc, ready, stdout, stdout_at = self.proc, self._ready, self.stdout, self.stdout_at

        def pump():
            for line in proc.stdout:
                stdout_at.append(time.monotonic())
                stdout.append(line.rstrip("\n"))
                m = re.search(r"listening for SMTP on (\S+):(\d+)$", line.strip())
                if m and not ready.is_set():
                    self.port = int(m.group(2))
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        return self

    def start(self, timeout: float = 60.0) -> "Petrel":
        self.spawn()
        if not self._ready.wait(timeout) or self.port is None:
            self.stop()
            raise RuntimeError(f"petrel-mta did not start: {self.log_tail()}")
        return self

    def stdout_line(self, needle: str) -> tuple[float, str] | None:
        """(seconds from spawn, line) of the first stdout line containing needle."""
        for at, line in zip(self.stdout_at, self.stdout):
            if needle in line:
                return at - self.spawned_at, line
        return None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-n:] + " | " + " / ".join(self.stdout[-5:])
        except OSError:
            return ""

    def group(self) -> ProcGroup:
        return ProcGroup(lambda: [self.proc.pid] if self.proc and self.proc.poll() is None else [])

    def admin_address(self) -> str:
        """The loopback admin endpoint, as petrel-mta printed it."""
        line = wait_until(
            lambda: next((l for l in self.stdout if "admin endpoint" in l), None),
            30, "the admin endpoint line", interval=0.05,
        )
        return line.rsplit(" on ", 1)[1]

    def queue(self, *args: str, timeout: float = 120.0) -> None:
        """Runs `petrel-mta queue ARGS` against this instance (the config names the admin
        token file the CLI authenticates with)."""
        subprocess.run([str(self.binary), "queue", "--config", str(self.config),
                        "--admin", self.admin_address(), *args],
                       check=True, capture_output=True, timeout=timeout)

    def status_kib(self, key: str) -> int:
        return proc_status_kib(self.proc.pid, key) or 0

    def stop(self) -> None:
        if self.proc:
            stop_proc(self.proc, timeout=60)


def check_config(binary: Path, workdir: Path, text: str) -> tuple[bool, str]:
    path = workdir / f"check-{time.monotonic_ns()}.yaml"
    path.write_text(text)
    res = subprocess.run(
        [str(binary), "check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    path.unlink()
    return res.returncode == 0, (res.stdout + res.stderr).replace(f"{path}: ", "").strip()


def petrel_config(
    spool: Path,
    maildir: str,
    hold: bool,
    relay_port: int | None = None,
    max_conn: int = 1000,
    max_conn_ip: int = 1000,
    port: int = 0,
) -> str:
    text = f"""\
hostname: mx.bench.test
listeners:
  - address: 127.0.0.1:{port}
smtpd:
  max_connections: {max_conn}
  max_connections_per_ip: {max_conn_ip}
  # Like Postfix's defaults: no per-client rate limits while measuring throughput.
  rate_limits:
    messages_per_ip: "off"
    recipients_per_ip: "off"
    messages_per_user: "off"
admin:
  address: 127.0.0.1:0
spool:
  path: {spool}
"""
    if hold:
        text += "queue:\n  hold_all: true\n"
    text += f"""\
local_domains:
  - name: example.test
    delivery:
      maildir:
        root: {maildir}
"""
    if relay_port is not None:
        text += f"""\
relay:
  client_networks: ["127.0.0.0/8"]
routes:
  - domain: "*"
    smarthost: "127.0.0.1:{relay_port}"
    tls: none
"""
    return text


class PetrelModes:
    """Which of the keys this build understands, decided once with check-config."""

    def __init__(self, binary: Path, workdir: Path):
        spool = workdir / "probe-spool"
        ok, msg = check_config(binary, workdir, petrel_config(spool, str(workdir / "md"), True))
        self.hold_all = ok
        self.hold_note = (
            "held with queue.hold_all"
            if ok
            else "queue.hold_all refused by check-config; held by deferring: local Maildir root "
            "/dev/null/nowhere, so every delivery attempt fails and the message stays queued "
            "(each message also costs one failed delivery attempt and a status record)"
        )
        self.hold_refusal = "" if ok else msg.splitlines()[0] if msg else ""
        ok, msg = check_config(
            binary, workdir, petrel_config(spool, str(workdir / "md"), False, relay_port=2)
        )
        self.relay = ok
        self.relay_refusal = "" if ok else (msg.splitlines()[0] if msg else "")
        res = subprocess.run([str(binary), "queue", "--help"], capture_output=True, timeout=30)
        self.queue_cli = res.returncode == 0

    def accept_config(self, workdir: Path, **kw) -> str:
        if self.hold_all:
            return petrel_config(workdir / "spool", str(workdir / "maildir"), True, **kw)
        return petrel_config(workdir / "spool", "/dev/null/nowhere", False, **kw)


# --------------------------------------------------------------------------------------
# The five lines


def measure_run(group: ProcGroup, fn, peak_rss_fn=None) -> dict:
    """Runs fn() (returns elapsed seconds and message count) while sampling the group."""
    os.sync()  # start every run with no dirty pages left over from the one before
    cpu0 = group.cpu()
    with Sampler(group) as sampler:
        elapsed, messages = fn()
    cpu = group.cpu() - cpu0
    peak_rss_kib = peak_rss_fn() if peak_rss_fn else sampler.peak_rss
    return {
        "messages": messages,
        "elapsed_s": round(elapsed, 3),
        "msgs_per_s": round(messages / elapsed, 1),
        "cpu_s": round(cpu, 3),
        "cpu_s_per_1k": round(cpu / messages * 1000, 4),
        "peak_rss_mib": round(peak_rss_kib / 1024, 1),
        "peak_pss_mib": round(sampler.peak_pss / 1024, 1),
        "peak_processes": sampler.peak_procs,
    }


class Line:
    """One row of the table: a way to run R throughput runs and one latency pass."""

    name = ""
    short = ""
    rcpt = "user@example.test"

    def __init__(self, args, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.runs: list[dict] = []
        self.latency: dict | None = None
        self.notes: list[str] = []
        self.status = "ok"
        self.reason = ""

    def available(self) -> str | None:
        return tools_missing()

    def run_once(self, index: int) -> dict:
        raise NotImplementedError

    def latency_once(self) -> dict:
        raise NotImplementedError

    def summary(self) -> dict:
        rates = [r["msgs_per_s"] for r in self.runs]
        out = {
            "name": self.name,
            "short": self.short,
            "status": self.status,
            "reason": self.reason,
            "notes": self.notes,
            "runs": self.runs,
            "latency": self.latency,
        }
        if rates:
            out.update(
                msgs_per_s_min=min(rates),
                msgs_per_s_median=round(statistics.median(rates), 1),
                msgs_per_s_max=max(rates),
                cpu_s_per_1k=round(statistics.median(r["cpu_s_per_1k"] for r in self.runs), 4),
                peak_rss_mib=max(r["peak_rss_mib"] for r in self.runs),
                peak_pss_mib=max(r["peak_pss_mib"] for r in self.runs),
            )
        return out


class Ceiling(Line):
    name = "ceiling (smtp-source -> smtp-sink)"
    short = "Ceiling"

    def run_once(self, index):
        # No -c here: smtp-source fails unless every message got its 250.
        sink = Sink(self.workdir, count=False)
        try:
            n = self.args.messages

            def go():
                return run_source(sink.port, self.args, n, self.rcpt, source_timeout(n)), n

            return measure_run(sink.group(), go)
        finally:
            sink.stop()

    def latency_once(self):
        sink = Sink(self.workdir, count=False)
        try:
            return latency_pass(sink.port, self.rcpt, self.args)
        finally:
            sink.stop()


class PostfixAccept(Line):
    name = "Postfix accept (held)"
    short = "Postfix accept"

    def available(self):
        return postfix_available()

    def run_once(self, index):
        pf = Postfix(self.workdir, "accept").start()
        try:
            n = self.args.messages

            def go():
                return run_source(pf.port, self.args, n, self.rcpt, source_timeout(n)), n

            result = measure_run(pf.group(), go)
            held = wait_until(
                lambda: (c := pf.count_queue("hold")) >= n and c, 30, f"{n} messages in hold/"
            )
            result["held"] = held
            return result
        finally:
            pf.stop()

    def latency_once(self):
        pf = Postfix(self.workdir, "accept").start()
        try:
            return latency_pass(pf.port, self.rcpt, self.args)
        finally:
            pf.stop()


class PostfixRelay(Line):
    name = "Postfix relay (-> smtp-sink)"
    short = "Postfix relay"
    rcpt = "user@remote.test"

    def available(self):
        return postfix_available()

    def run_once(self, index):
        sink = Sink(self.workdir)
        pf = None
        try:
            pf = Postfix(self.workdir, "relay", relay_port=sink.port).start()
            n = self.args.messages

            def go():
                start = time.monotonic()
                run_source(pf.port, self.args, n, self.rcpt, source_timeout(n))
                done = sink.wait_count(n, source_timeout(n))
                return done - start, n

            return measure_run(pf.group(), go)
        finally:
            if pf:
                pf.stop()
            sink.stop()

    def latency_once(self):
        sink = Sink(self.workdir)
        pf = None
        try:
            pf = Postfix(self.workdir, "relay", relay_port=sink.port).start()
            result = latency_pass(pf.port, self.rcpt, self.args)
            return result
        finally:
            if pf:
                pf.stop()
            sink.stop()


class PetrelAccept(Line):
    name = "Petrel accept (held)"
    short = "Petrel accept"

    def __init__(self, args, workdir, modes: PetrelModes):
        super().__init__(args, workdir)
        self.modes = modes
        self.notes.append(modes.hold_note)

    def available(self):
        if not self.args.binary.exists():
            return f"{self.args.binary} does not exist (cargo build --release -p mta)"
        return tools_missing()

    def _server(self, tag: str) -> Petrel:
        d = self.workdir / f"petrel-accept-{tag}-{time.monotonic_ns()}"
        d.mkdir()
        return Petrel(self.args.binary, d, self.modes.accept_config(d)).start()

    def run_once(self, index):
        mta = self._server(f"run{index}")
        try:
            n = self.args.messages

            def go():
                return run_source(mta.port, self.args, n, self.rcpt, source_timeout(n)), n

            return measure_run(mta.group(), go, lambda: mta.status_kib("VmHWM"))
        finally:
            mta.stop()

    def latency_once(self):
        mta = self._server("latency")
        try:
            return latency_pass(mta.port, self.rcpt, self.args)
        finally:
            mta.stop()


class PetrelRelay(Line):
    name = "Petrel relay (-> smtp-sink)"
    short = "Petrel relay"
    rcpt = "user@remote.test"

    def __init__(self, args, workdir, modes: PetrelModes):
        super().__init__(args, workdir)
        self.modes = modes

    def available(self):
        if not self.args.binary.exists():
            return f"{self.args.binary} does not exist"
        if tools_missing():
            return tools_missing()
        if not self.modes.relay:
            if self.modes.relay_refusal:
                self.notes.append(f"check-config refused the relay keys: {self.modes.relay_refusal}")
            return "relay not available in this build"
        return None

    def _start(self, tag):
        sink = Sink(self.workdir)
        d = self.workdir / f"petrel-relay-{tag}-{time.monotonic_ns()}"
        d.mkdir()
        try:
            cfg = petrel_config(d / "spool", str(d / "maildir"), False, relay_port=sink.port)
            return sink, Petrel(self.args.binary, d, cfg).start()
        except Exception:
            sink.stop()
            raise

    def run_once(self, index):
        sink, mta = self._start(f"run{index}")
        try:
            n = self.args.messages

            def go():
                start = time.monotonic()
                run_source(mta.port, self.args, n, self.rcpt, source_timeout(n))
                done = sink.wait_count(n, source_timeout(n))
                return done - start, n

            return measure_run(mta.group(), go, lambda: mta.status_kib("VmHWM"))
        finally:
            mta.stop()
            sink.stop()

    def latency_once(self):
        sink, mta = self._start("latency")
        try:
            return latency_pass(mta.port, self.rcpt, self.args)
        finally:
            mta.stop()
            sink.stop()


# --------------------------------------------------------------------------------------
# Also measured


def dkim_signing_cost(args) -> str:
    """µs to DKIM-sign one 2 KB message (RSA-2048, Ed25519), from mta-auth's sign_bench
    example built in release mode."""
    n = 200 if args.smoke else 2000
    try:
        out = subprocess.run(
            ["cargo", "run", "-q", "--release", "-p", "mta-auth", "--example", "sign_bench",
             str(n)],
            cwd=ROOT, capture_output=True, text=True, timeout=1200,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"skipped: {e}"
    if out.returncode != 0:
        return f"error: {out.stderr.strip()[-300:]}"
    return "; ".join(out.stdout.strip().splitlines())


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def idle_connections(args, workdir: Path, modes: PetrelModes) -> dict:
    limit = raise_fd_limit()
    want = args.idle_connections
    n = max(0, min(want, limit - 256))
    if n < 10:
        raise Skip(f"file-descriptor limit {limit} too low")
    d = workdir / "petrel-idle"
    cfg = modes.accept_config(d, max_conn=n + 100, max_conn_ip=n + 100)
    mta = Petrel(args.binary, d, cfg).start()
    socks: list[socket.socket] = []
    try:

        def open_one() -> socket.socket:
            s = socket.create_connection((HOST, mta.port), timeout=30)
            f = s.makefile("rb")
            try:
                if not f.readline().startswith(b"220"):
                    raise RuntimeError("no 220 greeting")
                s.sendall(b"EHLO client.bench.test\r\n")
                while True:
                    line = f.readline()
                    if not line.startswith(b"250"):
                        raise RuntimeError(f"EHLO -> {line!r}")
                    if line[3:4] == b" ":
                        break
            finally:
                f.close()
            return s

        # Warm up the allocator and the runtime, then take the baseline.
        for s in [open_one() for _ in range(20)]:
            s.close()
        time.sleep(0.5)
        rss0 = mta.status_kib("VmRSS")
        start = time.monotonic()
        for _ in range(n):
            socks.append(open_one())
        opened = time.monotonic() - start
        time.sleep(1.0)
        rss1 = mta.status_kib("VmRSS")
        for s in socks:
            s.close()
        socks.clear()
        time.sleep(1.0)
        rss2 = mta.status_kib("VmRSS")
        per = (rss1 - rss0) * 1024 / n
        return {
            "connections": n,
            "requested": want,
            "fd_limit": limit,
            "rss_before_mib": round(rss0 / 1024, 1),
            "rss_with_connections_mib": round(rss1 / 1024, 1),
            "rss_after_close_mib": round(rss2 / 1024, 1),
            "bytes_per_connection": round(per),
            "kib_per_connection": round(per / 1024, 2),
            "open_seconds": round(opened, 2),
            "vmhwm_mib": round(mta.status_kib("VmHWM") / 1024, 1),
        }
    finally:
        for s in socks:
            s.close()
        mta.stop()


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def binary_label(role: str, binary: Path) -> str:
    """'after', or 'before (<commit>)' when a COMMIT file sits next to the baseline binary
    (how a saved copy is kept), else 'before (<path>)'."""
    if role == "after":
        return "after"
    try:
        ident = (binary.parent / "COMMIT").read_text().split()[0]
    except (OSError, IndexError):
        ident = str(binary)
    return f"before ({ident})"


def queue_binaries(args) -> list[tuple[str, Path]]:
    """(role, binary) pairs the queue stage measures, the baseline first."""
    out = []
    if args.baseline_binary:
        out.append(("before", args.baseline_binary))
    if not args.baseline_only:
        out.append(("after", args.binary))
    return out


def first_greeting(port: int, proc: subprocess.Popen, timeout: float) -> float:
    """Monotonic time at which a connection to port got its 220 greeting. Connects until
    one is accepted (a listener that is bound but not yet accepting is waited on through
    the connection already made); a refused connect or a 4xx greeting is tried again."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"petrel-mta exited ({proc.returncode}) before greeting")
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"no 220 greeting on port {port} in {timeout:.0f}s")
        try:
            sock = socket.create_connection((HOST, port), timeout=min(left, 1.0))
        except OSError:
            time.sleep(0.01)
            continue
        with sock:
            sock.settimeout(max(left, 0.1))
            try:
                with sock.makefile("rb") as f:
                    greeting = f.readline()
            except OSError:
                greeting = b""
            at = time.monotonic()
            if greeting.startswith(b"220"):
                try:
                    sock.sendall(b"QUIT\r\n")
                except OSError:
                    pass
                return at
        time.sleep(0.01)


class LogWatch:
    """Reads a growing log file from an offset, for the first line containing a needle."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.pending = b""

    def find(self, needle: bytes) -> str | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(1 << 24)
        except OSError:
            return None
        self.offset += len(chunk)
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) > 1 << 16:
            self.pending = b""
        return next((l.decode(errors="replace") for l in lines if needle in l), None)


def wait_recovered(mta: Petrel, log: LogWatch, timeout: float) -> tuple[float | None, str]:
    """Seconds from spawn until a stdout line, else a log line, contains "recovered"
    (the log's line is timed when it is read, every 50 ms), and that line. Gives up
    (None, "") when the process has used under 2% CPU for 3 s in a row: recovery is then
    over and the binary prints no such line."""
    deadline = time.monotonic() + timeout
    quiet_since, cpu_prev, cpu_at = None, mta.group().cpu(), time.monotonic()
    while time.monotonic() < deadline:
        found = mta.stdout_line("recovered")
        if found:
            return round(found[0], 3), found[1]
        line = log.find(b"recovered")
        if line:
            return round(time.monotonic() - mta.spawned_at, 3), line.strip()
        now = time.monotonic()
        if now - cpu_at >= 1.0:
            cpu = mta.group().cpu()
            busy = (cpu - cpu_prev) / (now - cpu_at) >= 0.02
            cpu_prev, cpu_at = cpu, now
            quiet_since = None if busy else (quiet_since or now)
            if quiet_since and now - quiet_since >= 3.0:
                return None, ""
        time.sleep(0.05)
    return None, ""


def reset_peak_rss(pid: int) -> bool:
    """Resets the process's VmHWM to its current RSS (clear_refs 5); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def scaled_timeout(n: int) -> float:
    """For a step whose work grows with the queue: 2 minutes plus 2 ms per message."""
    return 120.0 + n / 500.0


def queue_disk_bytes(n: int, message_size: int) -> int:
    """What a queue of n messages needs on disk: the spool keeps each message with its
    envelope and records (about 2.5 KB for a 2,000-byte message), plus the logs."""
    return n * (message_size + 1024)


def queue_gauges(mta: "Petrel") -> tuple[int, int] | None:
    """(waiting, active) from petrel-mta's /metrics, or None while it does not answer."""
    line = next((l for l in mta.stdout if "/metrics, /healthz" in l), None)
    if not line:
        return None
    url = line.rsplit(" on ", 1)[1] + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    def gauge(state: str) -> int:
        m = re.search(rf'^petrel_mta_queue_messages\{{state="{state}"\}} (\S+)$', text, re.M)
        return int(float(m.group(1))) if m else 0
    return gauge("waiting"), gauge("active")


def queue_one(args, workdir: Path, role: str, binary: Path, modes: PetrelModes, n: int) -> dict:
    """One binary, one size: enqueue n messages, restart, deliver them all.

    held (--queue-state held): queue.hold_all keeps them; `queue release --all` sends them.
    deferred: the relay destination is a port nobody listens on, so every message is
    attempted, refused and deferred (a destination down for a day); after the restart
    smtp-sink starts on that port and `queue flush` sends them."""
    msg_size = args.queue_message_size
    deferred = args.queue_state == "deferred"
    entry: dict = {"queued": n, "binary": role, "label": binary_label(role, binary),
                   "state": args.queue_state}
    d = workdir / f"petrel-queue-{role}-{n}"
    d.mkdir()
    flush = modes.hold_all and modes.relay and modes.queue_cli
    # Deferred: the sink's port is chosen now and stays closed until the flush.
    relay_port = free_port() if deferred else None
    sink = Sink(d) if flush and not deferred else None
    mta = None
    try:
        def config(port: int) -> str:
            if deferred:
                return petrel_config(d / "spool", str(d / "maildir"), False,
                                     relay_port=relay_port, port=port) + \
                    "http:\n  address: 127.0.0.1:0\n"
            if sink:
                return petrel_config(d / "spool", str(d / "maildir"), True,
                                     relay_port=sink.port, port=port)
            return modes.accept_config(d, port=port)

        rcpt = PetrelRelay.rcpt if sink or deferred else "user@example.test"
        mta = Petrel(binary, d, config(0)).start()
        time.sleep(0.3)
        rss0 = mta.status_kib("VmRSS")
        cpu0 = mta.group().cpu()
        os.sync()
        elapsed = run_source(mta.port, args, n, rcpt, source_timeout(n), size=msg_size)
        if deferred:
            t0 = time.monotonic()
            wait_until(lambda: queue_gauges(mta) == (n, 0), source_timeout(n),
                       f"all {n:,} messages attempted and deferred", interval=0.5)
            entry["all_deferred_s"] = round(time.monotonic() - t0, 2)
        time.sleep(1.0)
        rss1 = mta.status_kib("VmRSS")
        cpu = mta.group().cpu() - cpu0
        spool = dir_bytes(d / "spool")
        entry.update({
            "message_bytes": msg_size,
            "enqueue_s": round(elapsed, 2),
            "enqueue_us_per_msg": round(elapsed / n * 1e6, 1),
            "msgs_per_s": round(n / elapsed, 1),
            "cpu_s_per_1k": round(cpu / n * 1000, 4),
            "rss_before_mib": round(rss0 / 1024, 1),
            "rss_after_enqueue_mib": round(rss1 / 1024, 1),
            "peak_rss_enqueue_mib": round(mta.status_kib("VmHWM") / 1024, 1),
            "rss_bytes_per_queued_msg": round((rss1 - rss0) * 1024 / n),
            "spool_bytes_per_msg": round(spool / n),
        })
        log(f"  {entry['label']}: enqueued {n:,} in {elapsed:.1f}s, RSS {rss0 / 1024:.1f} -> "
            f"{rss1 / 1024:.1f} MiB")

        # Restart: the index is rebuilt from the spool alone. Timed from the spawn to the
        # first 220 greeting on a fresh port (the old one may linger in TIME_WAIT).
        mta.stop()
        os.sync()
        port = free_port()
        mta.config.write_text(config(port))
        log_watch = LogWatch(mta.logfile)
        mta.spawn()
        greeted = first_greeting(port, mta.proc, scaled_timeout(n))
        entry["restart_to_greeting_s"] = round(greeted - mta.spawned_at, 3)
        listening = mta.stdout_line("listening for SMTP on")
        entry["restart_to_listening_line_s"] = round(listening[0], 3) if listening else None
        entry["restart_to_recovered_line_s"], entry["recovered_line"] = wait_recovered(
            mta, log_watch, scaled_timeout(n))
        time.sleep(0.5)
        rss2 = mta.status_kib("VmRSS")
        entry["rss_after_restart_mib"] = round(rss2 / 1024, 1)
        entry["rss_bytes_per_recovered_msg"] = round((rss2 - rss0) * 1024 / n)
        entry["peak_rss_restart_mib"] = round(mta.status_kib("VmHWM") / 1024, 1)
        log(f"  {entry['label']}: greeting after {entry['restart_to_greeting_s']}s, "
            f"recovered line after {entry['restart_to_recovered_line_s']}s, "
            f"RSS {entry['rss_after_restart_mib']} MiB")

        if deferred:
            sink = Sink(d, port=relay_port)
        if sink:
            reset = reset_peak_rss(mta.proc.pid)
            with Sampler(mta.group()) as sampler:
                t0 = time.monotonic()
                mta.queue(*(("flush",) if deferred else ("release", "--all")),
                          timeout=scaled_timeout(n))
                done = sink.wait_count(n, source_timeout(n))
            entry["flush_s"] = round(done - t0, 2)
            entry["flush_msgs_per_s"] = round(n / (done - t0), 1)
            peak = mta.status_kib("VmHWM") if reset else sampler.peak_rss
            entry["peak_rss_flush_mib"] = round(peak / 1024, 1)
            entry["peak_rss_flush_from"] = "VmHWM, reset before the flush" if reset else \
                "VmRSS sampled every 0.25 s"
            log(f"  {entry['label']}: flushed in {entry['flush_s']}s, peak RSS "
                f"{entry['peak_rss_flush_mib']} MiB")
        peaks = [entry.get(k) for k in ("peak_rss_enqueue_mib", "peak_rss_restart_mib",
                                        "peak_rss_flush_mib")]
        entry["peak_rss_mib"] = max(p for p in peaks if p is not None)
        return entry
    finally:
        if mta:
            mta.stop()
        if sink:
            sink.stop()
        if args.keep:
            log(f"kept {d}")
        else:
            # A million messages are gigabytes: free them before the next size.
            shutil.rmtree(d, ignore_errors=True)
            os.sync()


def queue_scaling(args, workdir: Path) -> dict:
    """Per size, and per binary (the baseline first, when given): enqueue N held messages
    for a relayed domain, restart (recovery from the spool alone), then `queue release
    --all` and time until smtp-sink counted all N. Binaries alternate within a size, so
    background drift hits both alike."""
    binaries = []
    for role, binary in queue_binaries(args):
        modes = PetrelModes(binary, workdir)
        flush = modes.hold_all and modes.relay and modes.queue_cli
        binaries.append({
            "binary": role,
            "label": binary_label(role, binary),
            "path": str(binary),
            "held_by": modes.hold_note if args.queue_state == "held" else
            "deferred: the relay destination refused connections until the flush",
            "flush": ("flushed with `petrel-mta queue flush` once smtp-sink listened"
                      if args.queue_state == "deferred" else
                      "released with `petrel-mta queue release --all`") if flush
            else "skipped: this build cannot hold and relay",
            "_modes": modes,
        })
    results, errors = [], []
    for n in args.queue_sizes:
        for b in binaries:
            need = queue_disk_bytes(n, args.queue_message_size) + (1 << 30)
            free = shutil.disk_usage(workdir).free
            entry = {"queued": n, "binary": b["binary"], "label": b["label"]}
            if free < need:
                entry["error"] = (f"skipped: needs about {need / 2**30:.1f} GiB of disk, "
                                  f"{free / 2**30:.1f} GiB free under {workdir}")
            else:
                log(f"queue scaling {n:,}: {b['label']} ({b['path']}); load "
                    f"{os.getloadavg()[0]:.2f}, {free / 2**30:.0f} GiB free")
                try:
                    entry = queue_one(args, workdir, b["binary"], Path(b["path"]), b["_modes"], n)
                except Exception as e:
                    entry["error"] = f"{type(e).__name__}: {e}"
            if "error" in entry:
                errors.append(f"{n:,} queued, {b['label']}: {entry['error']}")
                log(f"queue scaling {n:,} {b['label']}: {entry['error']}")
            results.append(entry)
    for b in binaries:
        del b["_modes"]
    return {
        "message_bytes": args.queue_message_size,
        "state": args.queue_state,
        "sessions": args.sessions,
        "binaries": binaries,
        "sizes": results,
        "errors": errors,
    }


QUEUE_TARGETS = ("targets (issue 17; reported, never asserted): peak RSS with 1,000,000 queued "
                 "<= 128 MiB; restart to the first 220 greeting <= 3 s")


def queue_report(q: dict) -> list[str]:
    out = [f"queue scaling ({q['message_bytes']:,}-byte payload, {q['sessions']} sessions, "
           f"one connection per message, messages {q.get('state', 'held')}):"]
    out.append(
        "| queued | binary | enqueue msg/s | RSS MiB idle -> queued | RSS B / queued msg "
        "| peak RSS MiB enqueue | restart to 220 s | 'recovered' line s | RSS MiB recovered "
        "| RSS B / recovered msg | peak RSS MiB restart | flush msg/s | peak RSS MiB flush |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e in q["sizes"]:
        if "error" in e:
            out.append(f"| {e['queued']:,} | {e['label']} | {e['error']} |" + " |" * 10)
            continue
        out.append(
            f"| {e['queued']:,} | {e['label']} | {fmt(e['msgs_per_s'], 0)} "
            f"| {fmt(e['rss_before_mib'])} -> {fmt(e['rss_after_enqueue_mib'])} "
            f"| {fmt(e['rss_bytes_per_queued_msg'])} | {fmt(e['peak_rss_enqueue_mib'])} "
            f"| {fmt(e['restart_to_greeting_s'], 2)} | {fmt(e['restart_to_recovered_line_s'], 2)} "
            f"| {fmt(e['rss_after_restart_mib'])} | {fmt(e['rss_bytes_per_recovered_msg'])} "
            f"| {fmt(e['peak_rss_restart_mib'])} | {fmt(e.get('flush_msgs_per_s'), 0)} "
            f"| {fmt(e.get('peak_rss_flush_mib'))} |"
        )
    by = {(e["queued"], e["binary"]): e for e in q["sizes"] if "error" not in e}
    for n in dict.fromkeys(e["queued"] for e in q["sizes"]):
        b, a = by.get((n, "before")), by.get((n, "after"))
        if b and a:
            out.append(
                f"{n:,} queued, before -> after: peak RSS {fmt(b['peak_rss_mib'])} -> "
                f"{fmt(a['peak_rss_mib'])} MiB; restart to 220 "
                f"{fmt(b['restart_to_greeting_s'], 2)} -> {fmt(a['restart_to_greeting_s'], 2)} s; "
                f"flush {fmt(b.get('flush_msgs_per_s'), 0)} -> "
                f"{fmt(a.get('flush_msgs_per_s'), 0)} msg/s"
            )
    out.append(
        "RSS B / queued msg = (VmRSS after enqueue - VmRSS of the idle process before it) / N; "
        "RSS B / recovered msg = (VmRSS after the restart's recovery - that same idle VmRSS) / N. "
        "peak RSS = VmHWM of petrel-mta: enqueue (since its start), restart (since the "
        "restart, recovery included), flush (reset just before the release)."
    )
    out.append(
        "restart to 220 = from spawning petrel-mta until a connection got its 220 greeting "
        "(polled); 'recovered' line = from the spawn until stdout (else the log) said "
        "'recovered' (– when the binary prints none); flush = N / time from "
        "`queue release --all` (held) or `queue flush` (deferred) until smtp-sink counted "
        "all N."
    )
    for b in q["binaries"]:
        out.append(f"{b['label']}: {b['path']}; {b['held_by']}; flush: {b['flush']}")
    out.append(QUEUE_TARGETS)
    return out


# --------------------------------------------------------------------------------------
# Report


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def table(lines: list[dict]) -> str:
    head = (
        "| line | msg/s min / median / max | p50 ms | p99 ms | CPU s / 1k msg | peak RSS MiB "
        "| peak PSS MiB | notes |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for s in lines:
        if s["status"] != "ok":
            rows.append(f"| {s['name']} | {s['status']}: {s['reason']} | | | | | | |")
            continue
        lat = s["latency"] or {}
        notes = []
        if lat:
            notes.append(f"latency pass: {lat['ok']} msgs at {lat['client_msgs_per_s']:,.0f} msg/s")
        if s["runs"] and "peak_processes" in s["runs"][0] and s["runs"][0]["peak_processes"] > 1:
            notes.append(f"{max(r['peak_processes'] for r in s['runs'])} processes")
        rows.append(
            f"| {s['name']} | {fmt(s['msgs_per_s_min'], 0)} / {fmt(s['msgs_per_s_median'], 0)} / "
            f"{fmt(s['msgs_per_s_max'], 0)} | {fmt(lat.get('p50_ms'), 2)} | {fmt(lat.get('p99_ms'), 2)} "
            f"| {fmt(s['cpu_s_per_1k'], 3)} | {fmt(s['peak_rss_mib'])} | {fmt(s['peak_pss_mib'])} "
            f"| {'; '.join(notes)} |"
        )
    return "\n".join(rows)


def ratio_lines(by: dict) -> list[str]:
    def med(key):
        s = by.get(key)
        return s.get("msgs_per_s_median") if s and s["status"] == "ok" else None

    out = []
    for kind in ("accept", "relay"):
        p, q = med(f"petrel_{kind}"), med(f"postfix_{kind}")
        if p and q:
            out.append(f"Petrel/Postfix {kind}: {p / q:.2f}x (median msg/s {p:,.0f} / {q:,.0f}; goal >= 3x)")
        else:
            out.append(f"Petrel/Postfix {kind}: n/a (a line was skipped)")
    p, c = med("petrel_accept"), med("ceiling")
    if p and c:
        out.append(f"Petrel accept/ceiling: {p / c * 100:.0f}% (goal >= 50%)")
    pl = (by.get("petrel_accept") or {}).get("latency")
    ql = (by.get("postfix_accept") or {}).get("latency")
    if pl and ql:
        out.append(
            f"p99 accept latency Petrel/Postfix: {pl['p99_ms']:.2f} ms / {ql['p99_ms']:.2f} ms "
            f"(goal: Petrel <= Postfix)"
        )
    return out


# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20000, help="messages per run (20000)")
    p.add_argument("--sessions", type=int, default=50, help="parallel SMTP sessions (50)")
    p.add_argument("--size", type=int, default=2048, help="message payload bytes (2048)")
    p.add_argument("--runs", type=int, default=3, help="runs per line; min/median/max (3)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny run: a few hundred messages, 1 run")
    p.add_argument("--bin", "--binary", dest="binary", type=Path, default=None,
                   help="petrel-mta binary (env PETREL_MTA_BIN; default target/release, else debug)")
    p.add_argument("--latency-messages", type=int, default=None,
                   help="messages in each latency pass (default min(messages, 5000))")
    p.add_argument("--idle-connections", type=int, default=None,
                   help="idle connections to hold against petrel-mta (10000)")
    p.add_argument("--queue-sizes", default=None,
                   help="comma-separated queue sizes for the scaling test (10000,100000)")
    p.add_argument("--queue-state", choices=("held", "deferred"), default="held",
                   help="queue scaling: messages held (queue.hold_all; released with "
                   "`queue release --all`) or deferred (their destination refuses "
                   "connections; flushed with `queue flush` once a sink listens) (held)")
    p.add_argument("--queue-message-size", type=int, default=2000,
                   help="payload bytes of each queued message in the scaling test (2000)")
    p.add_argument("--baseline-binary", type=Path, default=None,
                   help="queue scaling: also measure this petrel-mta, as 'before', at every "
                   "size in the same run (env PETREL_BASELINE_BIN)")
    p.add_argument("--baseline-only", action="store_true",
                   help="queue scaling: measure the baseline binary alone")
    p.add_argument("--only", default=None,
                   help="comma-separated subset: ceiling,postfix_accept,postfix_relay,"
                   "petrel_accept,petrel_relay,idle,queue,dkim")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent of the temporary directory (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.smoke:
        args.messages = 300 if args.messages == 20000 else args.messages
        args.sessions = 10 if args.sessions == 50 else args.sessions
        args.runs = 1
        args.latency_messages = args.latency_messages or 200
        args.idle_connections = args.idle_connections or 200
        args.queue_sizes = args.queue_sizes or "300,1000"
    args.latency_messages = args.latency_messages or min(args.messages, 5000)
    args.idle_connections = args.idle_connections or 10000
    args.queue_sizes = [int(x) for x in (args.queue_sizes or "10000,100000").split(",") if x]
    args.binary = (args.binary or default_binary()).resolve()
    baseline = args.baseline_binary or os.environ.get("PETREL_BASELINE_BIN")
    args.baseline_binary = Path(baseline).resolve() if baseline else None
    if args.baseline_only and not args.baseline_binary:
        p.error("--baseline-only needs --baseline-binary (or PETREL_BASELINE_BIN)")
    if args.baseline_binary and not args.baseline_binary.exists():
        p.error(f"baseline binary {args.baseline_binary} not found")
    for name in ("messages", "sessions", "runs", "latency_messages"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.size < 0 or args.queue_message_size < 0:
        p.error("--size and --queue-message-size must not be negative")
    if any(n < 1 for n in args.queue_sizes):
        p.error("--queue-sizes must all be at least 1")
    stages = {"ceiling", "postfix_accept", "postfix_relay", "petrel_accept", "petrel_relay",
              "idle", "queue", "dkim"}
    if args.only and not set(args.only.split(",")) <= stages:
        p.error(f"--only takes a comma-separated subset of {', '.join(sorted(stages))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(",")) if args.only else None

    def wanted(key):
        return only is None or key in only

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="petrel-bench-", dir=args.workdir))
    os.chmod(workdir, 0o755)  # Postfix's unprivileged processes walk through it
    failures: list[str] = []
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "loadavg_start": os.getloadavg(),
        },
        "parameters": {
            "messages": args.messages,
            "sessions": args.sessions,
            "size": args.size,
            "runs": args.runs,
            "latency_messages": args.latency_messages,
            "smoke": args.smoke,
            "binary": str(args.binary),
            "baseline_binary": str(args.baseline_binary) if args.baseline_binary else None,
            "queue_message_size": args.queue_message_size,
            "one_connection_per_message": True,
        },
    }
    try:
        log(f"workdir {workdir}; petrel-mta {args.binary}"
            + (f"; baseline {args.baseline_binary}" if args.baseline_binary else ""))
        # Only --baseline-only with nothing but the queue stage leaves --binary unused.
        if not (args.baseline_only and only == {"queue"}):
            if not args.binary.exists():
                raise SystemExit(
                    f"petrel-mta binary {args.binary} not found: cargo build --release -p mta")
            modes = PetrelModes(args.binary, workdir)
            if not modes.hold_all:
                print(f"note: {modes.hold_note}. check-config said: {modes.hold_refusal}")
        lines: dict[str, Line] = {}
        if wanted("ceiling"):
            lines["ceiling"] = Ceiling(args, workdir)
        if wanted("postfix_accept"):
            lines["postfix_accept"] = PostfixAccept(args, workdir)
        if wanted("postfix_relay") and not args.smoke:
            lines["postfix_relay"] = PostfixRelay(args, workdir)
        if wanted("petrel_accept"):
            lines["petrel_accept"] = PetrelAccept(args, workdir, modes)
        if wanted("petrel_relay"):
            lines["petrel_relay"] = PetrelRelay(args, workdir, modes)
        for line in lines.values():
            reason = line.available()
            if reason:
                line.status, line.reason = "skipped", reason
                log(f"{line.short}: skipped ({reason})")
        # Round-robin over the lines so background load drifts hit them all alike.
        for r in range(args.runs):
            for key, line in lines.items():
                if line.status != "ok":
                    continue
                log(f"{line.name}: run {r + 1}/{args.runs}")
                try:
                    res = line.run_once(r)
                    line.runs.append(res)
                    log(f"  {res['msgs_per_s']:,.0f} msg/s, cpu {res['cpu_s_per_1k']} s/1k, "
                        f"rss {res['peak_rss_mib']} MiB, pss {res['peak_pss_mib']} MiB")
                except Skip as e:
                    line.status, line.reason = "skipped", str(e)
                except Exception as e:
                    line.status, line.reason = "error", f"{type(e).__name__}: {e}"
                    failures.append(f"{line.name}: {line.reason}")
                    log(f"  FAILED: {line.reason}")
        for key, line in lines.items():
            if line.status != "ok":
                continue
            log(f"{line.name}: latency pass ({args.latency_messages} messages)")
            try:
                line.latency = line.latency_once()
                log(f"  p50 {line.latency['p50_ms']} ms, p99 {line.latency['p99_ms']} ms")
            except Exception as e:
                line.notes.append(f"latency pass failed: {e}")
                failures.append(f"{line.name} latency: {type(e).__name__}: {e}")
                log(f"  latency FAILED: {e}")
        summaries = {k: l.summary() for k, l in lines.items()}
        report["lines"] = summaries

        if wanted("idle") and args.binary.exists():
            log(f"idle connections: up to {args.idle_connections}")
            try:
                report["idle_connections"] = idle_connections(args, workdir, modes)
            except Skip as e:
                report["idle_connections"] = {"skipped": str(e)}
            except Exception as e:
                report["idle_connections"] = {"error": f"{type(e).__name__}: {e}"}
                failures.append(f"idle connections: {e}")
        if wanted("queue"):
            log(f"queue scaling: {args.queue_sizes}")
            try:
                report["queue_scaling"] = queue_scaling(args, workdir)
                failures.extend(f"queue scaling: {e}" for e in report["queue_scaling"]["errors"])
            except Exception as e:
                report["queue_scaling"] = {"error": f"{type(e).__name__}: {e}"}
                failures.append(f"queue scaling: {e}")
        if wanted("dkim") and not args.smoke:
            report["dkim"] = dkim_signing_cost(args)
        else:
            report["dkim"] = "skipped (smoke run or not selected: it needs a release build)"
        report["machine"]["loadavg_end"] = os.getloadavg()

        print()
        if lines:
            print(
                f"## Petrel benchmark: {args.messages:,} messages x {args.runs} runs, "
                f"{args.sessions} sessions, {args.size:,}-byte payload, one connection per message"
            )
            print()
            print(table(list(summaries.values())))
            print()
            for l in ratio_lines(summaries):
                print(l)
            print()
            for s in summaries.values():
                for n in s["notes"]:
                    print(f"note ({s['name']}): {n}")
                if s["status"] == "skipped":
                    print(f"{s['short']}: skipped ({s['reason']})")
            if args.smoke and "postfix_relay" not in lines:
                print("Postfix relay: skipped (not part of --smoke)")
            print(
                "latency: separate pass with the harness's asyncio client (same sessions and "
                "size, one connection per message), time from the final '.' to the 250 reply"
            )
        else:
            print("## Petrel benchmark: " + ", ".join(sorted(only or ())))
            print()
        idle = report.get("idle_connections")
        if idle:
            if "kib_per_connection" in idle:
                print(
                    f"idle connections: {idle['connections']:,} held after EHLO, RSS "
                    f"{idle['rss_before_mib']} -> {idle['rss_with_connections_mib']} MiB = "
                    f"{idle['kib_per_connection']} KiB per connection (goal <= 64 KiB)"
                )
            else:
                print(f"idle connections: {idle}")
        q = report.get("queue_scaling")
        if q:
            if "sizes" in q:
                print("\n".join(queue_report(q)))
            else:
                print(f"queue scaling: {q}")
        print(f"DKIM signing cost: {report['dkim']}")
        la = report["machine"]
        print(f"load average at start {la['loadavg_start'][0]:.2f}, at end {la['loadavg_end'][0]:.2f} "
              f"({la['cpus']} CPUs): numbers from a busy machine are noisy")
        if failures:
            print("\nFAILED stages:")
            for f in failures:
                print(f"  - {f}")
        report["failures"] = failures
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"JSON written to {args.json}")
        return 1 if failures else 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        CHILDREN.cleanup()
        if args.keep:
            log(f"kept {workdir}")
        else:
            log("removing the temporary directory (queues of every run)")
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
