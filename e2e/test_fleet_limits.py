"""Issue 16, limits shared by the fleet: three petrel-mta on 127.0.0.2/3/4 share
`messages_per_ip: N/1m` and `recipients_per_domain: N/1m` through one Debian
redis-server (loopback, port from the OS, no persistence, its own temp dir).

1. Redis up: a client (127.0.0.1) sends N MAIL commands to each pod in turn: the fleet
   accepts N (+1 if a new slot came up meanwhile, one per 60/N s), the first pod all of
   them, the others (almost) none: the schedule is the fleet's, not each pod's.
   The same for recipients of one outside domain: another client (127.0.0.5) gives each
   pod in turn N RCPTs to far.test; the fleet accepts N of them.
2. redis-server SIGKILLed: the very first MAIL after the kill is already answered from
   each pod's local share (250 where the fleet's count, spent in 1, would say 451), and
   each pod accepts N/3 (its share), N in all; every pod then says
   `petrel_mta_rate_limit_backend{backend="local"} 1`, has counted a fallback and logged
   "Redis unreachable" once.
3. redis-server started again on the same port (empty, as nothing is persisted): every
   pod goes back to Redis, and the fleet accepts N again, as in 1.
4. redis-server stopped (SIGSTOP: connected, never answering): the first MAIL to each pod
   is answered all the same (from its local share: Redis cannot answer, so the call gave
   up at its timeout), the pods go local; SIGCONT: back on Redis.

Nothing sleeps to synchronise: every wait polls a condition with a deadline, and no
assertion is about how long something took (the times are printed).
"""

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import Mta, wait_for
from outbound import free_port

N = 12
RATE = f"{N}/1m"
SHARE = N // 3
PODS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
CLIENT = "127.0.0.1"
# The recipient-domain round's client: its own messages_per_ip count, untouched by 1.
DOMAIN_CLIENT = "127.0.0.5"
FAR_DOMAIN = "far.test"
# Each Redis call is bounded by this; generous for 2 busy cores, still far below what a
# client would notice.
REDIS_TIMEOUT = "200ms"

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class Redis:
    """A redis-server on 127.0.0.1:port, in its own directory, persisting nothing."""

    def __init__(self, root):
        self.dir = root / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--daemonize", "no", "--logfile", str(self.dir / "redis.log")],
            cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, timeout=15, what=f"redis-server on port {self.port}")
        return self

    def answers(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class Pod:
    def __init__(self, root, ip, redis_port):
        self.ip = ip
        self.dir = root / ip
        self.dir.mkdir()
        self.mta = Mta(self.dir, f"""\
hostname: {ip.replace('.', '-')}.petrel.test
listeners:
  - address: {ip}:0
smtpd:
  limit_exempt_networks: []
  # Refusals count as errors; the test makes many on one session.
  max_errors: 100
  rate_limits:
    messages_per_ip: "{RATE}"
    recipients_per_ip: "off"
    recipients_per_domain: "{RATE}"
    redis:
      url: redis://127.0.0.1:{redis_port}/0
      timeout: {REDIS_TIMEOUT}
      fleet_size: {len(PODS)}
spool:
  path: {self.dir / "spool"}
admin:
  address: {ip}:0
http:
  address: {ip}:0
relay:
  # RCPT to an outside domain (nothing is sent: no DATA).
  client_networks: ["127.0.0.0/8"]
""")
        self.http_port = None

    def start(self):
        self.mta.start(timeout=120)
        lines = "\n".join(self.mta.stdout_lines)
        m = re.search(r"/readyz on http://[\d.]+:(\d+)", lines)
        assert m, lines
        self.http_port = int(m.group(1))
        return self

    def metric(self, name):
        with urllib.request.urlopen(f"http://{self.ip}:{self.http_port}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def backend(self):
        """"redis" or "local", whichever the gauge says is in use."""
        for b in ("redis", "local"):
            if self.metric(f'petrel_mta_rate_limit_backend{{backend="{b}"}}') == 1:
                return b
        return None

    def log_count(self, text):
        return self.mta.log().count(text)


def mail_codes(pod, n):
    """n MAIL commands from CLIENT to `pod` on one session: their reply codes."""
    codes = []
    with smtplib.SMTP(pod.ip, pod.mta.port, source_address=(CLIENT, 0), timeout=30) as s:
        s.ehlo("client.test")
        for _ in range(n):
            code, _ = s.mail("sender@client.test")
            assert code in (250, 451), code
            codes.append(code)
            s.rset()
    return codes


def mail_attempts(pod, n):
    """n MAIL commands from CLIENT to `pod` on one session; how many got 250."""
    return mail_codes(pod, n).count(250)


def rcpt_attempts(pod, n):
    """One MAIL from DOMAIN_CLIENT to `pod`, then n RCPTs to FAR_DOMAIN; how many got
    250."""
    accepted = 0
    with smtplib.SMTP(pod.ip, pod.mta.port, source_address=(DOMAIN_CLIENT, 0),
                      timeout=30) as s:
        s.ehlo("client.test")
        code, reply = s.mail("sender@client.test")
        assert code == 250, (code, reply)
        for i in range(n):
            code, reply = s.rcpt(f"user{i}@{FAR_DOMAIN}")
            assert code in (250, 451), (code, reply)
            accepted += code == 250
        s.rset()
    return accepted


def mail_latency(pod):
    """Seconds one MAIL (accepted or refused) takes on an open session."""
    with smtplib.SMTP(pod.ip, pod.mta.port, source_address=(CLIENT, 0), timeout=30) as s:
        s.ehlo("client.test")
        started = time.monotonic()
        code, _ = s.mail("sender@client.test")
        took = time.monotonic() - started
        assert code in (250, 451), code
        return took


def round_of_attempts(pods, attempts=mail_attempts):
    """N attempts at each pod in turn: (accepted per pod, seconds taken)."""
    started = time.monotonic()
    accepted = [attempts(p, N) for p in pods]
    return accepted, time.monotonic() - started


def fleet_schedule(accepted, took):
    """One round under a shared rate: the fleet accepts N (+ a slot per 60/N s taken),
    the first pod all of them."""
    slack = 1 + int(took // (60 / N))
    assert N <= sum(accepted) <= N + slack, accepted
    assert accepted[0] >= N, accepted
    assert sum(accepted[1:]) <= slack, accepted


def switch_time(pods, backend):
    started = time.monotonic()
    wait_for(lambda: all(p.backend() == backend for p in pods), timeout=15,
             interval=0.05, what=f"every pod on {backend}")
    return time.monotonic() - started


@pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason="redis-server not installed")
def test_three_pods_share_a_rate_and_fall_back_to_their_share(tmp_path):
    redis = Redis(tmp_path).start()
    pods = []
    try:
        pods = [Pod(tmp_path, ip, redis.port).start() for ip in PODS]
        first = switch_time(pods, "redis")
        print(f"all pods on redis {first:.2f}s after the last start")

        # 1. Shared: the fleet's schedule. A slot comes up every 60/N s.
        accepted, took = round_of_attempts(pods)
        print(f"redis up: accepted per pod {accepted} in {took:.2f}s")
        fleet_schedule(accepted, took)
        accepted, took = round_of_attempts(pods, rcpt_attempts)
        print(f"redis up: recipients at {FAR_DOMAIN} accepted per pod {accepted} "
              f"in {took:.2f}s")
        fleet_schedule(accepted, took)

        # 2. Redis gone. No waiting for the pods to notice: the fleet's count for CLIENT
        # is spent (1), and Redis cannot answer, so a 250 can only come from a pod's own
        # share, fresh as no pod counted alone yet. Each pod's first MAIL after the kill
        # gets it, and each pod then accepts its share, N in all.
        redis.kill()
        started = time.monotonic()
        codes = [mail_codes(p, N) for p in pods]
        took = time.monotonic() - started
        accepted = [c.count(250) for c in codes]
        print(f"redis killed: accepted per pod {accepted} in {took:.2f}s, "
              f"first replies {[c[0] for c in codes]}")
        for c in codes:
            assert c[:SHARE] == [250] * SHARE, codes
        share_slack = int(took // (60 / SHARE))
        for a in accepted:
            assert SHARE <= a <= SHARE + share_slack, accepted
        assert sum(accepted) <= N + len(PODS) * share_slack, accepted
        for p in pods:
            assert p.backend() == "local", p.ip
            assert p.metric("petrel_mta_rate_limit_fallbacks_total") == 1
            wait_for(lambda: p.log_count("Redis unreachable") >= 1, timeout=5,
                     what=f"the fallback logged by {p.ip}")
        for p in pods:
            # Logged once per outage, not once per check.
            assert p.log_count("Redis unreachable") == 1, p.mta.log()

        # 3. Redis back (empty): shared again.
        redis.start()
        back = switch_time(pods, "redis")
        print(f"redis restarted: every pod on redis after {back:.2f}s")
        accepted, took = round_of_attempts(pods)
        print(f"redis back: accepted per pod {accepted} in {took:.2f}s")
        fleet_schedule(accepted, took)
        for p in pods:
            assert p.log_count("Redis reachable") == 2, p.mta.log()

        # 4. Redis hangs: a MAIL is answered all the same. Redis cannot answer while
        # stopped, so each answer came from the pod's share, once its call gave up.
        redis.proc.send_signal(signal.SIGSTOP)
        latencies = []
        for p in pods:
            latencies.append(mail_latency(p))
            assert p.backend() == "local", p.ip
            assert p.metric("petrel_mta_rate_limit_fallbacks_total") == 2
        print(f"redis stopped: MAIL answered in {max(latencies):.3f}s at most "
              f"(timeout {REDIS_TIMEOUT})")
        redis.proc.send_signal(signal.SIGCONT)
        back = switch_time(pods, "redis")
        print(f"redis continued: every pod on redis after {back:.2f}s")
        for p in pods:
            assert p.log_count("Redis unreachable") == 2, p.mta.log()
            assert p.log_count("Redis reachable") == 3, p.mta.log()
            assert p.metric("petrel_mta_rate_limit_fallbacks_total") == 2
    finally:
        for p in pods:
            p.mta.kill()
        redis.kill()
