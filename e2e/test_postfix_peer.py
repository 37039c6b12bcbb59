"""Postfix (Debian's package) as a real peer on both sides of petrel-mta:

* receiving: Petrel relays to Postfix, the MX of pfx.test found through dnsmasq, over
  opportunistic STARTTLS; Postfix's virtual(8) writes the mail into a Maildir, and a
  recipient Postfix refuses at RCPT comes back to the sender as an RFC 3464 bounce;
* sending: Postfix relays to Petrel (its relayhost), upgrading with STARTTLS, and Petrel
  delivers into its own Maildir.

The throwaway Postfix instances are the benchmark harness's (e2e/bench/run.py); they need
root, like Postfix itself."""

import email
import email.policy
import pwd
import shutil
import smtplib
import subprocess

import pytest

from bench.run import CHILDREN, Postfix, postfix_available
from conftest import Mta, maildir_files, wait_for
from outbound import Dns
from test_outbound import outbound_config, send

NOT_HERE = postfix_available() or (None if shutil.which("dnsmasq") else "dnsmasq is not installed")
pytestmark = pytest.mark.skipif(NOT_HERE is not None, reason=f"Postfix peer: {NOT_HERE}")

POSTFIX_MX = "127.0.0.8"


@pytest.fixture
def cleanup():
    yield
    CHILDREN.cleanup()


def self_signed(directory, name):
    """A certificate and key made by openssl, readable by Postfix's processes."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def postfix_mx(workdir):
    """Postfix as the MX of pfx.test: STARTTLS offered, alice@pfx.test delivered by
    virtual(8) into a Maildir, every other pfx.test address unknown (550 5.1.1)."""
    pf = Postfix(workdir, "peer", host=POSTFIX_MX)
    postfix_user = pwd.getpwnam("postfix")
    vmail = pf.dir / "vmail"
    vmail.mkdir()
    shutil.chown(vmail, "postfix", "postfix")
    (pf.etc / "vmailbox").write_text("alice@pfx.test alice/\n")
    cert, key = self_signed(pf.etc, "mx.pfx.test")
    main_cf = pf.etc / "main.cf"
    main_cf.write_text(main_cf.read_text() + "\n".join([
        "myhostname = mx.pfx.test",
        "virtual_mailbox_domains = pfx.test",
        f"virtual_mailbox_base = {vmail}",
        f"virtual_mailbox_maps = texthash:{pf.etc}/vmailbox",
        f"virtual_uid_maps = static:{postfix_user.pw_uid}",
        f"virtual_gid_maps = static:{postfix_user.pw_gid}",
        "smtpd_tls_security_level = may",
        f"smtpd_tls_cert_file = {cert}",
        f"smtpd_tls_key_file = {key}",
        "smtpd_tls_received_header = yes",
    ]) + "\n")
    return pf.start(), vmail / "alice" / "new"


def test_postfix_receives_relayed_mail_and_refuses_unknown_users(workdir, cleanup):
    pf, alice_new = postfix_mx(workdir)
    dns = Dns(mx=[("pfx.test", "mx.pfx.test", 10)], hosts=[("mx.pfx.test", POSTFIX_MX)])
    mta = Mta(workdir, outbound_config(workdir, dns.port, pf.port)).start()
    try:
        send(mta, "sender@example.test", ["alice@pfx.test"], subject="to-postfix")
        delivered = wait_for(lambda: sorted(alice_new.glob("*")) if alice_new.exists() else [],
                             what="Postfix's Maildir delivery")
        got = email.message_from_bytes(delivered[0].read_bytes(), policy=email.policy.default)
        assert got["Subject"] == "to-postfix"
        assert got["Return-Path"] == "<sender@example.test>"
        # Postfix's own Received header: Petrel (EHLO mx.petrel.test) upgraded to TLS.
        by_postfix = got.get_all("Received")[0]
        assert "from mx.petrel.test" in by_postfix, by_postfix
        assert "by mx.pfx.test (Postfix)" in by_postfix, by_postfix
        assert "(using TLSv1." in by_postfix and "with ESMTPS" in by_postfix, by_postfix
        assert "by mx.petrel.test (Petrel)" in got.get_all("Received")[1]

        send(mta, "sender@example.test", ["nobody@pfx.test"], subject="to-nobody")
        files = wait_for(lambda: maildir_files(workdir / "maildir", "sender"), what="bounce")
        bounce = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
        assert bounce.get_content_type() == "multipart/report"
        status = [p for p in bounce.iter_parts()
                  if p.get_content_type() == "message/delivery-status"][0]
        per_recipient = status.get_payload()[1]
        assert per_recipient["Final-Recipient"] == "rfc822; nobody@pfx.test"
        assert per_recipient["Action"] == "failed"
        assert per_recipient["Status"] == "5.1.1"
        assert per_recipient["Remote-MTA"] == "dns; mx.pfx.test"
        # Postfix's own words, passed on unchanged.
        assert "User unknown in virtual mailbox table" in per_recipient["Diagnostic-Code"]
        assert len(sorted(alice_new.glob("*"))) == 1
    finally:
        mta.kill()
        dns.stop()


def test_postfix_relays_into_petrel_over_starttls(workdir, cleanup):
    tls_dir = workdir / "tls"
    tls_dir.mkdir()
    cert, key = self_signed(tls_dir, "mx.petrel.test")
    mta = Mta(workdir, outbound_config(workdir, 1, 1) + f"""\
tls:
  cert_file: {cert}
  key_file: {key}
""").start()
    try:
        pf = Postfix(workdir, "relay", relay_host=mta.host, relay_port=mta.port,
                     main_cf=("smtp_tls_security_level = encrypt",)).start()
        msg = (b"From: someone@postfix.bench.test\r\nTo: bob@example.test\r\n"
               b"Subject: via-postfix\r\nMessage-ID: <via-postfix@postfix.test>\r\n\r\n"
               b"Relayed by Postfix.\r\n")
        with smtplib.SMTP(pf.host, pf.port, timeout=30) as s:
            s.sendmail("someone@postfix.bench.test", ["bob@example.test"], msg)
        files = wait_for(lambda: maildir_files(workdir / "maildir", "bob"),
                         what="Petrel's Maildir delivery")
        got = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
        assert got["Subject"] == "via-postfix"
        by_petrel = got.get_all("Received")[0]
        assert "from mx.postfix.bench.test" in by_petrel, by_petrel
        assert "with ESMTPS" in by_petrel, by_petrel
        assert "by mx.postfix.bench.test (Postfix)" in got.get_all("Received")[1]
    finally:
        mta.kill()
