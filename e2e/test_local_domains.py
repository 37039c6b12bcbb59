"""What a local domain can say about its recipients, over real SMTP: aliases (local and
forwarding off-site), a catch-all, and a domain whose mail is relayed to an inside server.
The client is not in a relay network, so everything off-site it reaches is the domain
owner's configuration, never the client's choice."""

import email
import email.policy
import shutil
import smtplib

import pytest

from conftest import Mta, maildir_files, mta_header, wait_for
from outbound import Dns, Sink, free_port

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")


@pytest.fixture
def world(workdir):
    """remote.test's MX and the inside server of gw.test, both aiosmtpd sinks."""
    dns = Dns(mx=[("remote.test", "mx.remote.test", 10)], hosts=[("mx.remote.test", "127.0.0.2")])
    port = free_port(host="127.0.0.2")
    remote, inside = Sink("127.0.0.2", port), Sink("127.0.0.3", port)
    config = mta_header(workdir) + f"""\
dns:
  nameservers: ["127.0.0.1:{dns.port}"]
smtp_client:
  port: {port}
queue:
  retry_interval: 1s
local_domains:
  - name: corp.test
    delivery:
      maildir:
        root: {workdir / "maildir"}
    recipients: [alice, bob, postmaster]
    aliases:
      sales: [alice@corp.test, partner@remote.test]
      team: [sales@corp.test, bob@corp.test]
    catch_all: postmaster@corp.test
  - name: gw.test
    delivery:
      relay:
        host: 127.0.0.3:{port}
        tls: none
"""
    mta = Mta(workdir, config).start()
    yield mta, remote, inside
    mta.kill()
    remote.stop()
    inside.stop()
    dns.stop()


def send(mta, rcpts, subject):
    msg = (f"From: outsider@elsewhere.test\r\nTo: {', '.join(rcpts)}\r\n"
           f"Subject: {subject}\r\n\r\nHello.\r\n").encode()
    with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
        s.ehlo("client.test")
        return s.sendmail("outsider@elsewhere.test", rcpts, msg)


def subject_of(path):
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)["Subject"]


def test_alias_expands_locally_and_forwards_off_site(workdir, world):
    mta, remote, _ = world
    send(mta, ["Team+q3@corp.test"], "team news")
    root = workdir / "maildir"
    alice = wait_for(lambda: maildir_files(root, "alice"), what="alice's copy")
    bob = wait_for(lambda: maildir_files(root, "bob"), what="bob's copy")
    assert [subject_of(p) for p in alice + bob] == ["team news", "team news"]
    forwarded = wait_for(lambda: remote.messages, what="the off-site copy")
    assert forwarded[0].recipients == ["partner@remote.test"]
    assert forwarded[0].sender == "outsider@elsewhere.test"
    assert not maildir_files(root, "postmaster"), "an alias is not an unknown user"


def test_unknown_user_goes_to_the_catch_all(workdir, world):
    mta, _, _ = world
    send(mta, ["nobody@corp.test"], "for whom")
    got = wait_for(lambda: maildir_files(workdir / "maildir", "postmaster"), what="catch-all")
    assert subject_of(got[0]) == "for whom"


def test_relay_domain_goes_to_its_inside_server(workdir, world):
    mta, remote, inside = world
    send(mta, ["anyone@gw.test"], "to the gateway")
    got = wait_for(lambda: inside.messages, what="delivery to gw.test's server")
    assert got[0].recipients == ["anyone@gw.test"]
    assert b"Subject: to the gateway" in got[0].content
    assert not remote.messages


def test_client_still_cannot_relay(workdir, world):
    mta, remote, _ = world
    with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("outsider@elsewhere.test")
        code, text = s.rcpt("partner@remote.test")
        assert (code, text[:5]) == (550, b"5.7.1"), (code, text)
