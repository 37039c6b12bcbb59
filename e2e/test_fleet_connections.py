"""Issue 16, connection limits shared by the fleet: three petrel-mta on 127.0.0.2/3/4 relay
to one smarthost (an aiosmtpd sink on 127.0.0.5 that counts the connections open at
once, per pod by EHLO name and in all) with `queue.max_connections_per_destination: 2`,
sharing one Debian redis-server (loopback, port from the OS, no persistence).

1. Redis up: 10 messages to each pod at once: every one delivered, and the sink never
   has more than 2 connections open from the whole fleet (it has exactly 2 at its
   busiest: the limit is reached, not merely unused).
2. 20 more to each pod; once some are out, redis-server is SIGKILLed: within a couple of
   seconds every pod says `petrel_mta_rate_limit_backend{backend="local"} 1`, counts a
   fallback and logs "Redis unreachable"; delivery goes on and every message arrives.
3. Redis still down, no connection left from before: 10 more to each pod: each pod has
   at most its share open, 2 // 3 -> 1 (at least 1), so the fleet at most 3.
4. redis-server started again on the same port (empty): every pod is back on Redis
   within a couple of seconds, and 10 more to each pod again see at most 2 in all.

The sink holds each message for HOLD seconds before its 250, like a slow destination, so
that connections overlap. Nothing sleeps to synchronise: every wait polls a condition
with a deadline.
"""

import asyncio
import os
import re
import smtplib
import threading
import time

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from conftest import Mta, wait_for
from outbound import free_port
from test_fleet_limits import REDIS_SERVER, Pod, Redis

LIMIT = 2
PODS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
SHARE = max(1, LIMIT // len(PODS))
SINK = "127.0.0.5"
CLIENT = "127.0.0.1"
# The limit is reached, so mail waits on Redis's answers: the longest timeout allowed
# keeps a busy machine from making a pod fall back on its own (a killed Redis is seen
# at once: its connections are reset).
REDIS_TIMEOUT = "1s"
# "Within a second" is the probe's period; a loaded machine may add a little.
SWITCH_DEADLINE = 3.0
# How long the sink takes to accept each message.
HOLD = 0.1


class CountingSMTP(SMTP):
    """aiosmtpd's server, telling its handler when a connection opens, greets (EHLO
    names the pod) and closes."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self.event_handler.opened()

    async def smtp_EHLO(self, hostname):
        await super().smtp_EHLO(hostname)
        self.event_handler.greeted(self, hostname)

    def connection_lost(self, error):
        self.event_handler.closed(self)
        super().connection_lost(error)


class Counter:
    """Connections open now and at most since the last reset, in all and per pod; the
    Subject of every message accepted."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open = 0
        self.max_open = 0
        self.per_pod = {}
        self.max_per_pod = {}
        self.pods = {}
        self.subjects = []

    def opened(self):
        with self.lock:
            self.open += 1
            self.max_open = max(self.max_open, self.open)

    def greeted(self, server, name):
        with self.lock:
            if id(server) in self.pods:
                return
            self.pods[id(server)] = name
            self.per_pod[name] = self.per_pod.get(name, 0) + 1
            self.max_per_pod[name] = max(self.max_per_pod.get(name, 0), self.per_pod[name])

    def closed(self, server):
        with self.lock:
            self.open -= 1
            name = self.pods.pop(id(server), None)
            if name:
                self.per_pod[name] -= 1

    def idle(self):
        with self.lock:
            return self.open == 0

    def reset(self):
        """Starts a new measurement; only when no connection is open."""
        with self.lock:
            assert self.open == 0, self.open
            self.max_open = 0
            self.max_per_pod = {}

    def maxima(self):
        with self.lock:
            return self.max_open, dict(self.max_per_pod)

    def delivered(self, prefix):
        with self.lock:
            return [s for s in self.subjects if s.startswith(prefix)]

    async def handle_DATA(self, server, session, envelope):
        # A slow destination (not synchronisation): connections overlap.
        await asyncio.sleep(HOLD)
        m = re.search(rb"^Subject: (\S+)\r$", envelope.original_content, re.M)
        with self.lock:
            self.subjects.append(m.group(1).decode() if m else "?")
        return "250 2.0.0 accepted by the counting sink"


class CountingController(Controller):
    def factory(self):
        return CountingSMTP(self.handler, **self.SMTP_kwargs)


class ConnectionPod(Pod):
    """A pod relaying everything to the sink, its connections limited by the fleet."""

    def __init__(self, root, ip, redis_port, sink_port):
        self.ip = ip
        self.name = f"pod{ip.rsplit('.', 1)[1]}.petrel.test"
        self.dir = root / ip
        self.dir.mkdir()
        self.mta = Mta(self.dir, f"""\
hostname: {self.name}
listeners:
  - address: {ip}:0
relay:
  client_networks: ["127.0.0.0/8"]
smtpd:
  rate_limits:
    messages_per_ip: "off"
    recipients_per_ip: "off"
    redis:
      url: redis://127.0.0.1:{redis_port}/0
      timeout: {REDIS_TIMEOUT}
      fleet_size: {len(PODS)}
routes:
  - domain: "*"
    smarthost: {SINK}:{sink_port}
    tls: none
queue:
  max_connections_per_destination: {LIMIT}
  retry_interval: 1s
  max_retry_interval: 2s
spool:
  path: {self.dir / "spool"}
admin:
  address: {ip}:0
http:
  address: {ip}:0
""")
        self.http_port = None


def send(pod, subjects):
    """One message per subject to `pod`, on one session."""
    with smtplib.SMTP(pod.ip, pod.mta.port, source_address=(CLIENT, 0), timeout=60) as s:
        s.ehlo("client.test")
        for subject in subjects:
            s.sendmail("sender@client.test", [f"{subject}@remote.test"],
                       f"From: sender@client.test\r\nTo: {subject}@remote.test\r\n"
                       f"Subject: {subject}\r\n\r\nHello from the fleet.\r\n")


def send_to_all(pods, phase, count):
    """`count` messages to every pod at once (a thread per pod); their subjects."""
    batches = [[f"{phase}-{p.ip.rsplit('.', 1)[1]}-{i}" for i in range(count)] for p in pods]
    errors = []

    def run(pod, subjects):
        try:
            send(pod, subjects)
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p, b)) for p, b in zip(pods, batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return sorted(s for b in batches for s in b)


def all_delivered(sink, phase, subjects):
    wait_for(lambda: len(sink.delivered(f"{phase}-")) >= len(subjects), timeout=90,
             what=f"every message of phase {phase} at the sink")
    assert sorted(sink.delivered(f"{phase}-")) == subjects, "each message exactly once"


def quiet(sink):
    """Waits until the pods have closed every connection (idle workers leave after 2s),
    then starts a new measurement."""
    wait_for(sink.idle, timeout=30, what="no connection open at the sink")
    sink.reset()


def switch_time(pods, backend):
    started = time.monotonic()
    wait_for(lambda: all(p.backend() == backend for p in pods), timeout=15,
             interval=0.05, what=f"every pod on {backend}")
    return time.monotonic() - started


@pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason="redis-server not installed")
def test_three_pods_share_connections_to_a_destination(tmp_path):
    sink = Counter()
    controller = CountingController(sink, hostname=SINK, port=free_port(host=SINK),
                                    decode_data=False)
    controller.start()
    redis = Redis(tmp_path).start()
    pods = []
    try:
        pods = [ConnectionPod(tmp_path, ip, redis.port, controller.port).start()
                for ip in PODS]
        switch_time(pods, "redis")
        names = sorted(p.name for p in pods)

        # 1. Shared: at most LIMIT connections from the whole fleet.
        quiet(sink)
        subjects = send_to_all(pods, "shared", 10)
        all_delivered(sink, "shared", subjects)
        most, per_pod = sink.maxima()
        print(f"redis up: {len(subjects)} delivered, at most {most} connections at once "
              f"(per pod {per_pod})")
        assert most == LIMIT, (most, per_pod)
        assert sorted(per_pod) == names, per_pod
        for p in pods:
            assert p.metric("petrel_mta_rate_limit_fallbacks_total") == 0, p.mta.log()

        # 2. Redis killed mid-delivery: each pod on its share, delivery goes on.
        quiet(sink)
        subjects = send_to_all(pods, "killed", 20)
        wait_for(lambda: len(sink.delivered("killed-")) >= 5, timeout=60,
                 what="the first messages out")
        redis.kill()
        out_before = len(sink.delivered("killed-"))
        assert out_before < len(subjects), "Redis must go while mail is on its way"
        down = switch_time(pods, "local")
        print(f"redis killed with {out_before}/{len(subjects)} delivered: every pod on "
              f"its local share after {down:.2f}s")
        assert down < SWITCH_DEADLINE, down
        all_delivered(sink, "killed", subjects)
        most, per_pod = sink.maxima()
        print(f"redis killed: all {len(subjects)} delivered, at most {most} at once "
              f"(per pod {per_pod}, connections from before the switch included)")
        for p in pods:
            assert p.metric("petrel_mta_rate_limit_fallbacks_total") == 1, p.mta.log()
            assert p.log_count("Redis unreachable") == 1, p.mta.log()

        # 3. Still down, nothing open from before: each pod at most its share.
        quiet(sink)
        subjects = send_to_all(pods, "local", 10)
        all_delivered(sink, "local", subjects)
        most, per_pod = sink.maxima()
        print(f"redis down: {len(subjects)} delivered, at most {most} at once "
              f"(per pod {per_pod}, share {SHARE})")
        assert sorted(per_pod) == names, per_pod
        assert all(n <= SHARE for n in per_pod.values()), per_pod
        assert most <= SHARE * len(PODS), most
        assert all(p.backend() == "local" for p in pods)

        # 4. Redis back (empty): shared again.
        redis.start()
        back = switch_time(pods, "redis")
        print(f"redis restarted: every pod on redis after {back:.2f}s")
        assert back < SWITCH_DEADLINE, back
        quiet(sink)
        subjects = send_to_all(pods, "back", 10)
        all_delivered(sink, "back", subjects)
        most, per_pod = sink.maxima()
        print(f"redis back: {len(subjects)} delivered, at most {most} at once "
              f"(per pod {per_pod})")
        assert most == LIMIT, (most, per_pod)
        for p in pods:
            assert p.log_count("Redis reachable") == 2, p.mta.log()
            assert p.log_count("Redis unreachable") == 1, p.mta.log()
    finally:
        for p in pods:
            p.mta.kill()
        redis.kill()
        controller.stop()
