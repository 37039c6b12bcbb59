"""Outbound delivery over loopback: MX lookup against a real DNS server (dnsmasq),
aiosmtpd sinks as the MX hosts, retries, bounces parsed by Python's email package,
null MX, restart with a full queue, and the queue CLI."""

import email
import email.policy
import json
import shutil
import smtplib
import subprocess

import pytest

from conftest import mta_header, BIN, Mta, maildir_files, wait_for
from outbound import Dns, FlakyDns, Sink, free_port

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")

MX = [
    ("remote.test", "mx1.remote.test", 10),
    ("pref.test", "mxa.pref.test", 10),   # nothing listens there
    ("pref.test", "mxb.pref.test", 20),
    ("bounce.test", "mx.bounce.test", 10),
    ("defer.test", "mx.defer.test", 10),
    ("down.test", "mx.down.test", 10),
    ("nullmx.test", ".", 0),
]
HOSTS = [
    ("mx1.remote.test", "127.0.0.2"),
    ("mxa.pref.test", "127.0.0.3"),
    ("mxb.pref.test", "127.0.0.4"),
    ("mx.bounce.test", "127.0.0.5"),
    ("mx.defer.test", "127.0.0.6"),
    ("mx.down.test", "127.0.0.7"),
]


@pytest.fixture
def world(workdir):
    """DNS + one port number shared by every sink (the MTA's smtp_client.port)."""
    dns = Dns(mx=MX, hosts=HOSTS)
    port = free_port(host="127.0.0.2")
    sinks = []

    def sink(ip, **behaviour):
        s = Sink(ip, port, **behaviour)
        sinks.append(s)
        return s

    yield dns, port, sink
    for s in sinks:
        s.stop()
    dns.stop()


def outbound_config(workdir, dns_port, smtp_port, **queue):
    queue_lines = "\n".join(f"  {k}: {v}" for k, v in {
        "retry_interval": "1s", "max_retry_interval": "2s", **queue}.items())
    return f"""\
{mta_header(workdir)}relay:
  client_networks: ["127.0.0.0/8"]
dns:
  nameservers: ["127.0.0.1:{dns_port}"]
smtp_client:
  port: {smtp_port}
  connect_timeout: 5s
queue:
{queue_lines}
local_domains:
  - name: example.test
    delivery:
      maildir:
        root: {workdir / "maildir"}
"""


def send(mta, sender, rcpts, subject="hello", extra=b""):
    msg = (f"From: {sender or 'bounce@x'}\r\nTo: {', '.join(rcpts)}\r\n"
           f"Subject: {subject}\r\nMessage-ID: <{subject}@petrel.test>\r\n\r\n").encode()
    msg += b"Hello from Petrel.\r\n" + extra
    with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
        s.ehlo("client.test")
        s.sendmail(sender, rcpts, msg)
    return msg


def admin_address(mta):
    line = next(l for l in mta.stdout_lines if "admin endpoint" in l)
    return line.rsplit(" on ", 1)[1]


def queue_cli(mta, *args):
    """`petrel-mta queue` as the MTA's user: the config names the admin token file."""
    out = subprocess.run([str(BIN), "queue", "--admin", admin_address(mta),
                          "--config", str(mta.config_path), *args],
                         capture_output=True, text=True, timeout=60)
    return out


def test_swaks_relay_via_mx_to_sink(workdir, world):
    dns, port, sink = world
    mx = sink("127.0.0.2")
    mta = Mta(workdir, outbound_config(workdir, dns.port, port)).start()
    try:
        out = subprocess.run(["swaks", "--server", f"{mta.host}:{mta.port}", "--from",
                              "me@example.test", "--to", "user@remote.test",
                              "--header", "Subject: relayed"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout
        got = wait_for(lambda: mx.messages, what="delivery to the remote.test MX")
        assert got[0].sender == "me@example.test"
        assert got[0].recipients == ["user@remote.test"]
        assert b"Subject: relayed" in got[0].content
        assert got[0].content.startswith(b"Received: from ")
        assert b"by mx.petrel.test (Petrel) with ESMTP id" in got[0].content
        # DANE is on (the default), but dnsmasq passes no DNSSEC records and serves no
        # signed root: validation cannot work, so DANE is not in effect (said once in
        # the log) rather than every MX answer being bogus and all mail deferred.
        log = mta.log()
        assert log.count("DNSSEC validation is unavailable") == 1, log
    finally:
        mta.kill()


def test_best_mx_down_uses_next_preference(workdir, world):
    dns, port, sink = world
    backup = sink("127.0.0.4")
    mta = Mta(workdir, outbound_config(workdir, dns.port, port)).start()
    try:
        send(mta, "me@example.test", ["user@pref.test"])
        got = wait_for(lambda: backup.messages, what="delivery to the backup MX")
        assert got[0].recipients == ["user@pref.test"]
    finally:
        mta.kill()


def test_4xx_then_success_and_queue_cli(workdir, world):
    dns, port, sink = world
    mx = sink("127.0.0.6", rcpt_reply="451 4.7.1 greylisted, try again", times=2)
    mta = Mta(workdir, outbound_config(workdir, dns.port, port)).start()
    try:
        send(mta, "me@example.test", ["user@defer.test"], subject="greylisted")
        got = wait_for(lambda: mx.messages, timeout=120, what="delivery after two 451s")
        assert mx.handler.refusals == 2
        assert got[0].recipients == ["user@defer.test"]
        wait_for(lambda: "0 message(s)" in queue_cli(mta, "list").stdout, what="empty queue")
    finally:
        mta.kill()


def test_5xx_gives_rfc3464_bounce(workdir, world):
    dns, port, sink = world
    sink("127.0.0.5", rcpt_reply="550 5.1.1 no such user here")
    mta = Mta(workdir, outbound_config(workdir, dns.port, port)).start()
    try:
        original = send(mta, "alice@example.test", ["ghost@bounce.test"], subject="doomed")
        files = wait_for(lambda: maildir_files(workdir / "maildir", "alice"), what="bounce")
        bounce = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
        assert bounce.get_content_type() == "multipart/report"
        assert bounce.get_param("report-type") == "delivery-status"
        assert bounce["Auto-Submitted"] == "auto-replied"
        parts = list(bounce.iter_parts())
        assert [p.get_content_type() for p in parts] == [
            "text/plain", "message/delivery-status", "message/rfc822"]
        status = parts[1]
        per_message, per_recipient = status.get_payload()[0], status.get_payload()[1]
        assert per_message["Reporting-MTA"] == "dns; mx.petrel.test"
        assert per_recipient["Action"] == "failed"
        assert per_recipient["Status"] == "5.1.1"
        assert per_recipient["Final-Recipient"] == "rfc822; ghost@bounce.test"
        assert "550 5.1.1 no such user here" in per_recipient["Diagnostic-Code"]
        assert per_recipient["X-Petrel-Class"] == "bad_mailbox; hard"
        returned = parts[2].get_payload()[0]
        assert returned["Subject"] == "doomed"
        assert original.split(b"\r\n\r\n", 1)[1] in files[0].read_bytes()
        # The bounce itself came from the null sender.
        assert files[0].read_bytes().startswith(b"Return-Path: <>\r\n")
    finally:
        mta.kill()


def test_4xx_with_a_permanent_bad_mailbox_code_is_never_retried(workdir, world):
    """Issue 17: 450 5.1.1 contradicts itself; a hard bad mailbox is not retried (the
    next attempt would be in an hour): bounced after the first attempt."""
    dns, port, sink = world
    sink("127.0.0.5", rcpt_reply="450 5.1.1 no such user here")
    mta = Mta(workdir, outbound_config(workdir, dns.port, port, retry_interval="1h",
                                       max_retry_interval="2h")).start()
    try:
        send(mta, "alice@example.test", ["ghost@bounce.test"])
        files = wait_for(lambda: maildir_files(workdir / "maildir", "alice"), what="bounce")
        text = files[0].read_bytes().decode()
        assert "Action: failed" in text and "Status: 5.1.1" in text
        assert "X-Petrel-Class: bad_mailbox; hard" in text
        assert "bad_mailbox" in mta.log()  # the delivery log line names the class
    finally:
        mta.kill()


def test_null_mx_bounces_at_once(workdir, world):
    dns, port, _ = world
    mta = Mta(workdir, outbound_config(workdir, dns.port, port)).start()
    try:
        send(mta, "alice@example.test", ["user@nullmx.test"])
        files = wait_for(lambda: maildir_files(workdir / "maildir", "alice"), what="bounce")
        text = files[0].read_bytes().decode()
        assert "Status: 5.1.10" in text and "null MX" in text
        assert "X-Petrel-Class: bad_domain; hard" in text
    finally:
        mta.kill()


def test_bounce_to_null_sender_is_not_sent(workdir, world):
    dns, port, sink = world
    sink("127.0.0.5", rcpt_reply="550 5.1.1 no such user here")
    mta = Mta(workdir, outbound_config(workdir, dns.port, port)).start()
    try:
        send(mta, "", ["ghost@bounce.test"])
        wait_for(lambda: "not notifying the null sender" in mta.log(), what="log line")
        wait_for(lambda: "0 message(s)" in queue_cli(mta, "list").stdout, what="empty queue")
        assert not (workdir / "maildir").exists() or not any((workdir / "maildir").rglob("new/*"))
    finally:
        mta.kill()


def test_queue_cli_shows_deferred_and_operates(workdir, world):
    dns, port, _ = world  # nothing listens for down.test: every attempt is deferred
    mta = Mta(workdir, outbound_config(workdir, dns.port, port, retry_interval="1h",
                                       max_retry_interval="2h")).start()
    try:
        send(mta, "alice@example.test", ["user@down.test"])
        listing = wait_for(
            lambda: (o := queue_cli(mta, "list").stdout) and "waiting" in o and o,
            what="a deferred message in the queue")
        assert "alice@example.test" in listing and "0/1" not in listing
        data = json.loads(queue_cli(mta, "--json", "list").stdout)
        (entry,) = data["messages"]
        assert entry["attempts"] >= 1 and entry["next_attempt_at"] > entry["received_at"]
        assert entry["recipients"][0]["status"]["state"] == "deferred"
        qid = entry["id"]
        qid_hex = f"{qid:016X}"
        show = queue_cli(mta, "show", qid_hex)
        assert show.returncode == 0 and "deferred" in show.stdout
        assert queue_cli(mta, "hold", qid_hex).returncode == 0
        assert "held" in queue_cli(mta, "list").stdout
        assert queue_cli(mta, "release", qid_hex).returncode == 0
        assert queue_cli(mta, "show", "FFFFFFFFFFFFFFFF").returncode == 1
        assert queue_cli(mta, "bounce", qid_hex).returncode == 0
        files = wait_for(lambda: maildir_files(workdir / "maildir", "alice"), what="bounce")
        assert b"bounced by the postmaster" in files[0].read_bytes()
    finally:
        mta.kill()


def test_restart_with_full_queue_delivers_everything(workdir, world):
    dns, port, sink = world
    config = outbound_config(workdir, dns.port, port)
    mta = Mta(workdir, config).start()
    try:
        for i in range(30):
            send(mta, "me@example.test", [f"u{i}@down.test"], subject=f"queued-{i}")
        wait_for(lambda: "30 message(s)" in queue_cli(mta, "list").stdout, what="30 queued")
    finally:
        mta.kill()
    mx = sink("127.0.0.7")
    mta = Mta(workdir, config).start()
    try:
        wait_for(lambda: len(mx.messages) >= 30, timeout=120, what="all 30 delivered")
        subjects = sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in mx.messages)
        assert subjects == sorted(f"queued-{i}".encode() for i in range(30))
    finally:
        mta.kill()


def test_many_messages_share_few_connections(workdir, world):
    dns, port, sink = world
    config = outbound_config(workdir, dns.port, port, max_connections_per_destination=2,
                             retry_interval="1h", max_retry_interval="1h")
    mta = Mta(workdir, config).start()
    try:
        # Nothing listens yet: all 40 are deferred, then flushed at once into a backlog.
        for i in range(40):
            send(mta, "me@example.test", [f"u{i}@remote.test"], subject=f"m{i}")
        wait_for(lambda: queue_cli(mta, "list").stdout.count("waiting") == 40, what="40 waiting")
        mx = sink("127.0.0.2")
        assert queue_cli(mta, "flush").returncode == 0
        wait_for(lambda: len(mx.messages) >= 40, timeout=120, what="40 delivered")
        connections = {m.peer for m in mx.messages}
        assert len(connections) <= 2, connections
    finally:
        mta.kill()


def test_expiry_bounces_deferred_mail(workdir, world):
    dns, port, _ = world
    config = outbound_config(workdir, dns.port, port, max_age="3s")
    mta = Mta(workdir, config).start()
    try:
        send(mta, "alice@example.test", ["user@down.test"])
        files = wait_for(lambda: maildir_files(workdir / "maildir", "alice"), timeout=60,
                         what="expiry bounce")
        text = files[0].read_bytes().decode()
        assert "Status: 5.4.7" in text and "expired" in text
    finally:
        mta.kill()


def test_delay_notice_then_expiry_bounce(workdir, world):
    dns, port, _ = world
    config = outbound_config(workdir, dns.port, port, delay_warning_after="2s", max_age="6s")
    mta = Mta(workdir, config).start()
    try:
        send(mta, "alice@example.test", ["user@down.test"], subject="slow")
        first = wait_for(lambda: maildir_files(workdir / "maildir", "alice"), timeout=60,
                         what="delay notice")
        notice = first[0].read_bytes().decode()
        assert "Action: delayed" in notice and "Will-Retry-Until:" in notice
        assert "Subject: Delayed Mail" in notice
        both = wait_for(lambda: len(f := maildir_files(workdir / "maildir", "alice")) >= 2 and f,
                        timeout=60, what="expiry bounce after the delay notice")
        texts = [f.read_bytes().decode() for f in both]
        assert sum("Action: delayed" in t for t in texts) == 1, "one delay notice only"
        assert any("Action: failed" in t and "Status: 5.4.7" in t for t in texts)
    finally:
        mta.kill()


def test_dns_servfail_defers_then_delivers(workdir, world):
    """SERVFAIL is a temporary failure: the message waits (no bounce), and goes out once
    DNS answers again."""
    dns, port, sink = world
    mx = sink("127.0.0.2")
    flaky = FlakyDns(dns.port)
    mta = Mta(workdir, outbound_config(workdir, flaky.port, port)).start()
    try:
        send(mta, "alice@example.test", ["user@remote.test"], subject="dns-trouble")
        entry = wait_for(
            lambda: [m for m in json.loads(queue_cli(mta, "--json", "list").stdout)["messages"]
                     if m["attempts"] >= 2],
            what="two attempts deferred by SERVFAIL")[0]
        status = entry["recipients"][0]["status"]
        assert status["state"] == "deferred", status
        assert status["detail"].startswith("451 4.4.3"), status
        assert flaky.servfails >= 2
        assert not mx.messages and not maildir_files(workdir / "maildir", "alice")
        flaky.broken = False
        got = wait_for(lambda: mx.messages, what="delivery once DNS answers")
        assert b"Subject: dns-trouble" in got[0].content
        assert not maildir_files(workdir / "maildir", "alice"), "no bounce, no delay notice"
    finally:
        mta.kill()
        flaky.stop()


def test_hold_all_keeps_mail_held_across_restart_until_released(workdir, world):
    """queue.hold_all holds what is accepted, and the hold is stored with the message:
    switching hold_all off and restarting does not release it; `release --all` does."""
    dns, port, sink = world
    mx = sink("127.0.0.2")
    held_config = outbound_config(workdir, dns.port, port, hold_all="true")
    mta = Mta(workdir, held_config).start()
    try:
        for i in range(3):
            send(mta, "alice@example.test", ["user@remote.test"], subject=f"held-{i}")
        listing = json.loads(queue_cli(mta, "--json", "list").stdout)["messages"]
        assert len(listing) == 3 and all(m["state"] == "held" for m in listing), listing
    finally:
        mta.stop()
    mta = Mta(workdir, outbound_config(workdir, dns.port, port)).start()
    try:
        listing = json.loads(queue_cli(mta, "--json", "list").stdout)["messages"]
        assert len(listing) == 3 and all(m["state"] == "held" for m in listing), listing
        assert not mx.messages
        out = queue_cli(mta, "release", "--all")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: len(mx.messages) == 3, what="the three released messages")
        assert queue_cli(mta, "release").returncode != 0, "an id or --all is required"
    finally:
        mta.kill()


def test_queue_show_names_the_host_that_deferred(workdir, world):
    dns, port, sink = world
    sink("127.0.0.6", rcpt_reply="451 4.7.1 greylisted, try again")
    mta = Mta(workdir, outbound_config(workdir, dns.port, port, retry_interval="1h",
                                       max_retry_interval="2h")).start()
    try:
        send(mta, "me@example.test", ["user@defer.test"], subject="greylisted")
        entry = wait_for(lambda: [m for m in json.loads(queue_cli(mta, "--json", "list").stdout)
                                  ["messages"] if m["attempts"] >= 1],
                         what="a deferred attempt")[0]
        assert entry["recipients"][0]["remote_mta"] == "mx.defer.test"
        show = queue_cli(mta, "show", f"{entry['id']:016X}").stdout
        assert "451 4.7.1 greylisted, try again (from mx.defer.test) [greylisted, soft]" in show, show
    finally:
        mta.kill()
