"""`petrel-mta queue sites`: what outbound shaping knows about each site, for an operator.

Two domains in a loopback DNS zone (dnsmasq): busy.sites.test, whose only MX host
(127.0.0.2) greets every connection with `421 4.7.0 too many connections` and hangs up,
and fine.sites.test (named `finemail` by a `queue.sites` rule), whose MX host (127.0.0.3)
is an aiosmtpd sink that accepts. The busy site is throttled at each attempt and, after
`suspend_after: 2` strikes, suspended for ten minutes; `queue sites` (and `--json`) must
show it first, suspended, with the reply that did it, and the fine site after it, healthy.

Every wait polls a condition with a deadline; ports come from the OS; all on loopback.
"""

import json
import shutil
import smtplib
import socket
import threading
from datetime import datetime, timedelta, timezone

import pytest

from conftest import wait_for
from conftest import Mta
from outbound import Dns, Sink, free_port
from test_outbound import queue_cli
from test_shaping import shaping_config

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")

BUSY = ("busy.sites.test", "mx1.sites.test", "127.0.0.2")
FINE = ("fine.sites.test", "mx2.sites.test", "127.0.0.3")
TOO_MANY = b"421 4.7.0 too many connections, try again later\r\n"
LIMITS = ("  site_limits: {suspend_after: 2, suspend_time: 10m, max_suspend_time: 20m}\n"
          f"  sites: [{{name: finemail, domains: [{FINE[0]}]}}]\n")


class BusySink:
    """A plain socket that greets every connection with 421 "too many connections" and
    closes it: a site that throttles every attempt."""

    def __init__(self, host, port):
        self.server = socket.create_server((host, port))
        self.server.settimeout(0.2)  # so that stop() is noticed
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                with self.lock:
                    self.connections += 1
                try:
                    conn.sendall(TOO_MANY)
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def stop(self):
        self.stopping.set()
        self.thread.join(10)
        self.server.close()


@pytest.fixture
def world(workdir):
    dns = Dns(mx=[(BUSY[0], BUSY[1], 10), (FINE[0], FINE[1], 10)],
              hosts=[BUSY[1:], FINE[1:]])
    threading.Thread(target=dns.proc.stderr.read, daemon=True).start()
    port = free_port(host=BUSY[2])
    busy = BusySink(BUSY[2], port)
    fine = Sink(FINE[2], port)
    yield dns, port, busy, fine
    fine.stop()
    busy.stop()
    dns.stop()


def sites_json(mta):
    out = queue_cli(mta, "--json", "sites")
    assert out.returncode == 0, out.stderr
    response = json.loads(out.stdout)
    assert response["result"] == "sites", response
    return response["sites"]


def test_a_suspended_site_is_listed_first_with_why(workdir, world):
    dns, port, busy, fine = world
    mta = Mta(workdir, shaping_config(workdir, dns.port, port, LIMITS)).start()
    try:
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
            s.ehlo("client.test")
            for domain in (BUSY[0], FINE[0]):
                s.sendmail("me@example.test", [f"user@{domain}"],
                           f"Subject: to {domain}\r\n\r\nHello.\r\n".encode())
        wait_for(lambda: fine.messages, timeout=60, what="delivery to the fine site")

        def suspended():
            sites = sites_json(mta)
            return sites if sites and sites[0].get("suspended_for_secs") else None
        sites = wait_for(suspended, timeout=60, interval=0.2, what="the busy site suspended")
        looked_at = datetime.now(timezone.utc)

        assert [s["site"] for s in sites] == [BUSY[1], "finemail"], sites
        busy_view, fine_view = sites
        assert busy_view["tls"] == "opportunistic"
        assert busy_view["configured"] is False
        assert busy_view["throttled"] is True
        assert busy_view["suspensions"] == 1
        assert busy_view["suspend_after"] == 2
        assert 0 < busy_view["suspended_for_secs"] <= 600, busy_view
        until = datetime.fromisoformat(busy_view["suspended_until"])
        assert looked_at < until <= looked_at + timedelta(seconds=601), busy_view
        # Refused with one connection open (its own, being greeted): a ceiling of 1.
        assert busy_view["connection_ceiling"] == 1, busy_view
        assert busy_view["connection_limit"] == 1, busy_view
        assert busy_view["max_connections"] == 20, busy_view
        assert "421 4.7.0 too many connections" in busy_view["last_reason"], busy_view
        with busy.lock:
            assert busy.connections >= 2, "two strikes: two refused connections"

        assert fine_view["tls"] == "opportunistic"
        assert fine_view["configured"] is True
        assert fine_view["throttled"] is False
        assert fine_view["strikes"] == 0
        assert fine_view["suspended_for_secs"] is None
        assert fine_view["suspended_until"] is None
        assert fine_view["last_reason"] is None
        assert fine_view["connection_limit"] == 20

        out = queue_cli(mta, "sites")
        assert out.returncode == 0, out.stderr
        print(out.stdout)
        lines = out.stdout.splitlines()
        assert lines[0].split()[:2] == ["SITE", "STATE"], out.stdout
        assert lines[1].startswith(f"{BUSY[1]} (opportunistic)"), out.stdout
        assert " suspended " in lines[1], out.stdout
        assert "until " + busy_view["suspended_until"][:10] in lines[1], out.stdout
        assert "too many connections" in lines[1], out.stdout
        assert lines[2].startswith("finemail (opportunistic)"), out.stdout
        assert " ok " in lines[2], out.stdout
        assert lines[-1] == "2 site(s)", out.stdout

        # Looking changed nothing: still suspended, the busy message still queued.
        assert sites_json(mta)[0]["suspensions"] == 1
        out = queue_cli(mta, "--json", "list")
        assert out.returncode == 0, out.stderr
        queued = json.loads(out.stdout)["messages"]
        assert [r["address"] for m in queued for r in m["recipients"]] == [f"user@{BUSY[0]}"]
    finally:
        mta.stop()
