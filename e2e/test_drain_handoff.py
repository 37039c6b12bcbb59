"""Issue 16, the proof on loopback without a cluster: three petrel-mta on 127.0.0.2/3/4
(own spools, ports from the OS kept across restarts, one fleet token file). The first
holds N messages deferred (its destination, an aiosmtpd sink, answers 451), and is
drained into the other two while the sender or a receiver is SIGKILLed three times at
random points of the hand-over (restarted on the same spool, the drain asked again).
While a receiver is down after its SIGKILL, the other receiver's count of messages
received keeps rising: the sender skips the failed peer. Then the destination accepts
and the receivers flush: every message is delivered exactly once (a unique token per
message), every spool is empty, and the sender's drained marker was written last: its
mtime is no earlier than any other change in the spool, and it survives a SIGKILL, with
nothing recovered.

N is PETREL_DRAIN_MESSAGES (default 10,000, the issue's figure); PETREL_DRAIN_SEED
replays a run's kill points. Nothing sleeps to synchronise: every wait polls a condition
with a deadline.
"""

import http.client
import json
import os
import random
import re
import secrets
import smtplib
import socket
import subprocess
import threading
import time
from collections import Counter

from conftest import BIN, Mta, wait_for
from outbound import Sink, free_port

N = int(os.environ.get("PETREL_DRAIN_MESSAGES", "10000"))
SEED = int(os.environ.get("PETREL_DRAIN_SEED") or random.randrange(1 << 30))
KILLS = 3
CLIENTS = 8
DESTINATION = "127.0.0.5"
# A drain offers at most this many messages at once (WORKERS in mta/src/drain/mod.rs): at
# most this many can be pinned to a peer that dies with their offers in flight.
HANDOFF_WORKERS = 16


class Node:
    """One petrel-mta on its own loopback address. Its ports come from the OS at the
    first start and are kept for restarts (a restarted pod keeps its name)."""

    def __init__(self, root, name, ip, sink_port, fleet_token_file):
        self.name, self.ip = name, ip
        self.dir = root / name
        self.dir.mkdir()
        self.sink_port, self.fleet_token_file = sink_port, fleet_token_file
        self.ports = {"smtp": 0, "http": 0, "admin": 0}
        self.mta = None
        self.starts = 0

    def config(self):
        return f"""\
hostname: {self.name}.petrel.test
listeners:
  - address: {self.ip}:{self.ports["smtp"]}
smtpd:
  rate_limits: {{messages_per_ip: "off", recipients_per_ip: "off"}}
spool:
  path: {self.dir / "spool"}
admin:
  address: {self.ip}:{self.ports["admin"]}
  fleet_token_file: {self.fleet_token_file}
http:
  address: {self.ip}:{self.ports["http"]}
relay:
  client_networks: ["127.0.0.0/8"]
routes:
  - domain: "*"
    smarthost: {DESTINATION}:{self.sink_port}
    tls: none
smtp_client:
  mta_sts: false
queue:
  retry_interval: 1h
  max_retry_interval: 1h
  delay_warning_after: "off"
"""

    def start(self):
        self.mta = Mta(self.dir, self.config(), env={"POD_NAME": self.name}).start(timeout=120)
        self.starts += 1
        lines = "\n".join(self.mta.stdout_lines)
        http_port = re.search(r"/readyz on http://[\d.]+:(\d+)", lines)
        admin_port = re.search(r"admin endpoint .* on [\d.]+:(\d+)", lines)
        assert http_port and admin_port, lines
        self.ports = {"smtp": self.mta.port, "http": int(http_port.group(1)),
                      "admin": int(admin_port.group(1))}
        return self

    def kill(self):
        self.mta.kill()

    @property
    def http_address(self):
        return f"{self.ip}:{self.ports['http']}"

    def request(self, method, path, body=None, token=None):
        """(status, parsed JSON or text); raises OSError while the process is down."""
        conn = http.client.HTTPConnection(self.ip, self.ports["http"], timeout=30)
        try:
            headers = {"Authorization": f"Bearer {token or self.fleet_token_file.read_text().strip()}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            text = response.read().decode()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text
        finally:
            conn.close()

    def drain(self, peers, deliver_for=1):
        status, body = self.request("POST", "/admin/drain",
                                    {"peers": peers, "deliver_for_secs": deliver_for})
        assert status == 202, (status, body)
        return body

    def status(self):
        """GET /admin/drain, or None while the process is down or starting."""
        try:
            status, body = self.request("GET", "/admin/drain")
        except OSError:
            return None
        assert status == 200, (status, body)
        return body

    def metric(self, series):
        status, text = self.request("GET", "/metrics")
        assert status == 200
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {series} on {self.name}")

    def admin(self, op):
        """One request line on the loopback admin endpoint (what `petrel-mta queue` sends)."""
        token = (self.dir / "admin.token").read_text().strip()
        with socket.create_connection((self.ip, self.ports["admin"]), timeout=60) as s:
            s.sendall((json.dumps({**op, "token": token}) + "\n").encode())
            reply = s.makefile().readline()
        return json.loads(reply)

    def log_count(self, text):
        return self.mta.log().count(text)

    def cli(self, *args):
        """`petrel-mta queue …` as the MTA's user (the config names the token file)."""
        return subprocess.run([str(BIN), "queue", "--config", str(self.mta.config_path),
                               "--admin", f"{self.ip}:{self.ports['admin']}", *args],
                              capture_output=True, text=True, timeout=60)


def message(token):
    return (f"From: <sender@client.test>\r\nTo: <rcpt@remote.test>\r\nSubject: {token}\r\n"
            f"Message-ID: <{token}@client.test>\r\n\r\nToken {token}: one copy only.\r\n").encode()


def inject(node, tokens):
    """Sends every token's message to `node` over CLIENTS connections; all must get 250."""
    errors = []
    chunks = [tokens[i::CLIENTS] for i in range(CLIENTS)]

    def client(chunk):
        try:
            with smtplib.SMTP(node.ip, node.ports["smtp"], timeout=120) as smtp:
                smtp.ehlo("client.test")
                for i, token in enumerate(chunk):
                    smtp.sendmail("sender@client.test", [f"user{i % 50}@remote.test"],
                                  message(token))
        except Exception as e:  # reported below: every message must be accepted
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(chunk,)) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def received(node):
    return node.metric('petrel_mta_handoff_messages_total{direction="received"}')


def latest_change(spool, besides):
    """(mtime in ns, path) of the latest change in `spool` other than `besides`: every
    file, and every folder below it (the spool folder's own mtime is the marker's
    creation)."""
    return max((p.stat().st_mtime_ns, p) for p in spool.rglob("*") if p != besides)


def kill_plan(rng):
    """Three kills, at least one of the sender and one of a receiver, each at a random
    share of the hand-over (by messages gone from the sender's spool)."""
    victims = ["sender", rng.choice(["b", "c"]), rng.choice(["sender", "b", "c"])]
    rng.shuffle(victims)
    points = sorted(rng.uniform(0.05, 0.9) for _ in range(KILLS))
    return list(zip(points, victims))


def test_drain_hands_over_every_message_exactly_once_through_sigkills(tmp_path):
    rng = random.Random(SEED)
    plan = kill_plan(rng)
    print(f"\nN={N} seed={SEED} kills={[(f'{p:.0%}', v) for p, v in plan]}")
    fleet_token = tmp_path / "fleet.token"
    fleet_token.write_text(secrets.token_hex(32) + "\n")
    sink_port = free_port(host=DESTINATION)
    sink = Sink(DESTINATION, sink_port, rcpt_reply="451 4.3.0 destination down, try later")
    nodes = {name: Node(tmp_path, name, ip, sink_port, fleet_token)
             for name, ip in [("sender", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4")]}
    sender, b, c = nodes["sender"], nodes["b"], nodes["c"]
    try:
        for node in nodes.values():
            node.start()
        peers = [b.http_address, c.http_address]
        tokens = [f"drain-{i:06d}-{secrets.token_hex(4)}" for i in range(N)]
        began = time.monotonic()

        inject(sender, tokens)
        injected = time.monotonic()
        # Every message tried once and deferred by the destination's 451.
        wait_for(lambda: sender.metric('petrel_mta_delivery_attempts_total{outcome="deferred"}') >= N,
                 timeout=300, interval=0.5, what="every message deferred once")
        assert sender.status()["left"] == N
        assert sink.messages == []
        deferred = time.monotonic()

        sender.drain(peers)
        kills = []
        # (receiver killed, the other, left at the sender, taken by the other meanwhile)
        peer_skipped = []
        for point, victim in plan:
            target = nodes[victim]

            def reached():
                s = sender.status()
                return s and (s["state"] == "drained" or N - s["left"] >= point * N) and s
            at = wait_for(reached, timeout=600, interval=0.02, what=f"{point:.0%} handed over")
            target.kill()
            kills.append((victim, N - at["left"]))
            if victim != "sender":
                # A failed peer is skipped: while it is down, the other one takes what the
                # sender still has, but for the offers to the dead one that were in flight
                # (pinned to it until it answers again).
                other = c if victim == "b" else b
                before = received(other)
                left = sender.status()["left"]
                owed = min(left - HANDOFF_WORKERS, 50)
                if owed > 0:
                    wait_for(lambda: received(other) - before >= owed, timeout=300,
                             interval=0.05,
                             what=f"{other.name} taking {owed} of the {left} left while "
                                  f"{victim} is down")
                peer_skipped.append((victim, other.name, left,
                                     int(received(other) - before)))
            target.start()
            sender.drain(peers)  # the operator asks again after any restart: idempotent
        print(f"SIGKILLs (victim, messages gone from the sender at the kill): {kills}")
        print("while a receiver was down (killed, other, left at the sender, taken by the "
              f"other meanwhile): {peer_skipped}")

        def drained():
            s = sender.status()
            return s and s["marker"] and s
        final = wait_for(drained, timeout=600, interval=0.05, what="the sender drained")
        handed_over = time.monotonic()
        # The marker is reported only once the spool is empty...
        assert final["state"] == "drained" and final["left"] == 0, final
        spool = sender.dir / "spool"
        marker = spool / "petrel-drained"
        assert marker.exists()
        # ...it was written last: nothing in the spool changed after it.
        latest, changed = latest_change(spool, marker)
        assert marker.stat().st_mtime_ns >= latest, (
            f"{changed.name} changed {(latest - marker.stat().st_mtime_ns) / 1e6:.3f} ms "
            f"after the marker; spool: {sorted(p.name for p in spool.rglob('*'))}")
        # ...and it was written after the emptiness was durable: a SIGKILL now recovers
        # nothing, and the pod comes back drained (still refusing mail).
        sender.kill()
        sender.start()
        again = wait_for(sender.status, what="the sender back")
        assert (again["state"], again["left"], again["marker"]) == ("drained", 0, True), again
        with socket.create_connection((sender.ip, sender.ports["smtp"]), timeout=30) as s:
            greeting = s.makefile("rb").readline()
        assert greeting.startswith(b"421 4.3.2 sender.petrel.test draining"), greeting
        # Nothing stored twice: the receivers hold exactly N between them.
        held = {name: nodes[name].status()["left"] for name in ("b", "c")}
        assert sum(held.values()) == N, held
        duplicates_recognised = sum(n.log_count("hand-over already stored here: duplicate")
                                    for n in (b, c))

        # Release the destination and flush: each message delivered exactly once.
        sink.handler.rcpt_reply = None
        for node in (b, c):
            flushed = node.admin({"op": "flush"})
            assert flushed["result"] == "done", flushed
        wait_for(lambda: all(n.status()["left"] == 0 for n in nodes.values()),
                 timeout=600, interval=0.2, what="every spool empty")
        delivered_at = time.monotonic()
        counts = Counter(re.search(rb"Subject: (\S+)", m.content).group(1).decode()
                         for m in sink.messages)
        lost = [t for t in tokens if counts[t] == 0]
        twice = [t for t, n in counts.items() if n > 1]
        strangers = set(counts) - set(tokens)
        assert lost == [], f"{len(lost)} lost, e.g. {lost[:5]}"
        assert twice == [], f"{len(twice)} delivered twice, e.g. {twice[:5]}"
        assert strangers == set(), strangers
        assert len(sink.messages) == N
        print(f"inject {injected - began:.1f}s, defer {deferred - injected:.1f}s, "
              f"drain with {len(kills)} SIGKILLs {handed_over - deferred:.1f}s, "
              f"deliver {delivered_at - handed_over:.1f}s, total {delivered_at - began:.1f}s; "
              f"receivers held {held}; resends recognised as duplicates: {duplicates_recognised}; "
              f"delivered {len(sink.messages)}, lost 0, duplicates 0")
    finally:
        for node in nodes.values():
            if node.mta:
                node.kill()
        sink.stop()


def test_a_person_drains_a_pod_by_hand_with_the_cli(tmp_path):
    """`petrel-mta queue drain --peer … --deliver-for …` (what `kubectl exec` runs) drives
    the same drain as the operator's POST, and `--status` shows its progress."""
    fleet_token = tmp_path / "fleet.token"
    fleet_token.write_text(secrets.token_hex(32) + "\n")
    sink_port = free_port(host=DESTINATION)
    sink = Sink(DESTINATION, sink_port, rcpt_reply="451 4.3.0 destination down, try later")
    sender = Node(tmp_path, "sender", "127.0.0.2", sink_port, fleet_token)
    peer = Node(tmp_path, "peer", "127.0.0.3", sink_port, fleet_token)
    try:
        sender.start()
        peer.start()
        tokens = [f"cli-{i:03d}" for i in range(20)]
        inject(sender, tokens)
        wait_for(lambda: sender.metric('petrel_mta_delivery_attempts_total{outcome="deferred"}') >= 20,
                 what="every message deferred")
        status = sender.cli("drain", "--status")
        assert status.returncode == 0, status.stderr
        assert "state:       serving" in status.stdout and "left:        20" in status.stdout, status.stdout

        started = sender.cli("drain", "--peer", peer.http_address, "--deliver-for", "0s")
        assert started.returncode == 0, started.stderr
        assert re.search(r"state: +(draining|handing_off|drained)", started.stdout), started.stdout

        def drained():
            out = sender.cli("--json", "drain", "--status")
            assert out.returncode == 0, out.stderr
            report = json.loads(out.stdout)
            return report["state"] == "drained" and report
        report = wait_for(drained, what="drained, as the CLI reports it")
        # The spool's identity: how peers recognise this MTA at another address.
        assert re.fullmatch(r"[0-9a-f]{16,}", report.pop("spool", "")), report
        assert report == {"result": "drain", "state": "drained", "left": 0, "delivered": 0,
                          "handed_off": 20, "marker": True, "peers": [peer.http_address]}, report
        shown = sender.cli("drain", "--status").stdout
        assert "marker:      written" in shown and "handed off:  20" in shown, shown
        assert peer.status()["left"] == 20

        bad = sender.cli("drain", "--peer", "not-a-peer")
        assert bad.returncode != 0 and "not host:port" in bad.stderr, bad
        cancelled = sender.cli("drain", "--cancel")
        assert cancelled.returncode == 0 and "state:       serving" in cancelled.stdout, cancelled
        assert not (sender.dir / "spool" / "petrel-drained").exists()
    finally:
        for node in (sender, peer):
            if node.mta:
                node.kill()
        sink.stop()
