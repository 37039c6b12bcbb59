"""Issue 13 (hardening), AUTH items over real sockets: password checks are bounded in
memory (item 1); failures lock out the source, not the account (item 2)."""

import base64
import smtplib
import threading
from pathlib import Path

from conftest import wait_for
from test_security import PASSWORD, insecure_context, start

MIB = 1024 * 1024


def auth_plain(port, source, user, password):
    """One AUTH PLAIN over STARTTLS from `source` (a loopback address); the reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0)) as s:
        s.starttls(context=insecure_context())
        s.ehlo("client.test")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return s.docmd("AUTH", "PLAIN " + token)


def test_failures_from_many_addresses_do_not_lock_the_user_out(workdir):
    """Before: five failures against alice from any mix of addresses gave alice 454 4.7.0
    everywhere for 15 minutes."""
    mta = start(workdir, ["submission"])
    try:
        port = mta.ports[0]
        for n in range(2, 8):
            code, _ = auth_plain(port, f"127.0.0.{n}", "alice@example.test", "wrong")
            assert code == 535
        code, text = auth_plain(port, "127.0.0.20", "alice@example.test", PASSWORD)
        assert (code, text[:5]) == (235, b"2.7.0"), (code, text)
    finally:
        mta.kill()


def test_a_failing_source_is_locked_out_for_that_user(workdir):
    mta = start(workdir, ["submission"])
    try:
        port = mta.ports[0]
        for _ in range(5):
            code, _ = auth_plain(port, "127.0.0.30", "alice@example.test", "wrong")
            assert code == 535
        code, text = auth_plain(port, "127.0.0.30", "alice@example.test", PASSWORD)
        assert (code, text[:5]) == (454, b"4.7.0"), "this source may not guess on"
        code, text = auth_plain(port, "127.0.0.31", "alice@example.test", PASSWORD)
        assert (code, text[:5]) == (235, b"2.7.0"), "alice from elsewhere still logs in"
    finally:
        mta.kill()


def status_kib(pid, field):
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def reset_peak(pid):
    """Resets VmHWM to the current RSS (Linux >= 4.0; we own the process)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


CONCURRENT_AUTH = 200
# Generous: two 19 MiB Argon2 checks at a time, TLS sessions and allocator slack.
PEAK_ABOVE_IDLE = 64 * MIB
# After the burst, resident memory comes back to within this of idle.
SETTLED_ABOVE_IDLE = 16 * MIB


def test_concurrent_auth_memory_is_bounded_and_returned(workdir):
    """Before: each Argon2 check (19 MiB) ran on its own blocking thread with no bound, and
    glibc kept the memory: 50 simultaneous AUTHs took RSS from 13 MB to 1 GB for good."""
    mta = start(workdir, ["submission"])
    try:
        port, pid = mta.ports[0], mta.proc.pid
        idle = status_kib(pid, "VmRSS")
        reset_peak(pid)
        ready = threading.Barrier(CONCURRENT_AUTH + 1, timeout=120)
        codes = []

        def client(n):
            source = f"127.0.2.{n + 1}"  # one address each: below max_connections_per_ip
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=300,
                                  source_address=(source, 0)) as s:
                    s.starttls(context=insecure_context())
                    s.ehlo("client.test")
                    token = base64.b64encode(
                        f"\0alice@example.test\0{PASSWORD}".encode()).decode()
                    ready.wait()
                    codes.append(s.docmd("AUTH", "PLAIN " + token)[0])
            except threading.BrokenBarrierError:
                codes.append("barrier")
            except Exception as e:  # reported below with the others
                codes.append(repr(e))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CONCURRENT_AUTH)]
        for t in threads:
            t.start()
        ready.wait()  # every client is connected, under TLS, and sends AUTH now
        for t in threads:
            t.join(timeout=600)
        peak = status_kib(pid, "VmHWM")
        print(f"idle RSS {idle / MIB:.1f} MiB, peak during {CONCURRENT_AUTH} AUTHs "
              f"{peak / MIB:.1f} MiB (+{(peak - idle) / MIB:.1f})")
        assert codes.count(235) == CONCURRENT_AUTH, sorted(map(str, codes))[:5]
        assert peak - idle < PEAK_ABOVE_IDLE, (
            f"peak RSS {peak / MIB:.1f} MiB is more than {PEAK_ABOVE_IDLE / MIB:.0f} MiB "
            f"above idle ({idle / MIB:.1f} MiB)")
        settled = wait_for(
            lambda: (rss := status_kib(pid, "VmRSS")) - idle < SETTLED_ABOVE_IDLE and rss,
            timeout=60, what="RSS back near idle")
        print(f"RSS after the burst {settled / MIB:.1f} MiB")
    finally:
        mta.kill()
