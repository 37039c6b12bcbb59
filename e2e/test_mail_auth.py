"""DKIM signing and inbound authentication through the running MTA: relayed mail carries
signatures that dkimpy verifies (RSA and Ed25519); inbound mail gets an
Authentication-Results header; a DMARC p=reject spoof is refused at end of DATA; a client
on a DNSBL is refused at RCPT."""

import smtplib

import dkim
import pytest

from conftest import mta_header, Mta, maildir_files, wait_for
from dkim_helpers import KeyPair, TxtDns, txt_dnsfunc
from outbound import Sink, free_port


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return KeyPair(d, "rsa"), KeyPair(d, "ed25519")


def base_config(workdir, extra):
    return f"""\
{mta_header(workdir)}local_domains:
  - name: example.test
    delivery:
      maildir:
        root: {workdir / "maildir"}
{extra}"""


def test_relayed_mail_is_signed_and_dkimpy_verifies_both(workdir, keys):
    rsa, ed = keys
    port = free_port()
    sink = Sink("127.0.0.1", port)
    mta = Mta(workdir, base_config(workdir, f"""\
relay:
  client_networks: ["127.0.0.0/8"]
routes:
  - domain: "*"
    smarthost: 127.0.0.1:{port}
    tls: none
dkim:
  keys:
    - {{domain: example.test, selector: rsa1, key_file: {rsa.path}}}
    - {{domain: example.test, selector: ed1, key_file: {ed.path}}}
""")).start()
    try:
        long_line = "x" * 900
        body = f"Grüße aus Petrel — ünïcödé body\r\n{long_line}\r\n".encode()
        message = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
                   b"Subject: a folded\r\n subject line\r\nMessage-ID: <m1@example.test>\r\n"
                   b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body)
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
            s.ehlo("client.test")
            s.sendmail("alice@example.test", ["bob@remote.test"], message,
                       mail_options=["BODY=8BITMIME"])
            # Mail that stays local is not signed.
            s.sendmail("alice@example.test", ["carol@example.test"], message)
        got = wait_for(lambda: sink.messages, what="relayed message")[0].content
        assert got.count(b"DKIM-Signature:") == 2, got[:600]
        dns = txt_dnsfunc({"rsa1._domainkey.example.test": rsa.record(),
                           "ed1._domainkey.example.test": ed.record()})
        verifier = dkim.DKIM(got)
        assert verifier.verify(idx=0, dnsfunc=dns), "first signature"
        assert verifier.verify(idx=1, dnsfunc=dns), "second signature"
        local = wait_for(lambda: maildir_files(workdir / "maildir", "carol"), what="local copy")
        assert b"DKIM-Signature:" not in local[0].read_bytes()
    finally:
        mta.kill()
        sink.stop()


def signed_by_dkimpy(message, key, selector, domain):
    sig = dkim.sign(message, selector.encode(), domain.encode(), key.private_b64_for_dkimpy(),
                    signature_algorithm=b"ed25519-sha256" if key.algorithm == "ed25519"
                    else b"rsa-sha256", include_headers=[b"from", b"to", b"subject"])
    return sig + message


def test_inbound_authentication_results_and_dmarc_reject(workdir, keys):
    _, ed = keys
    dns = TxtDns(txt=[
        ("sender.test", "v=spf1 ip4:127.0.0.0/8 -all"),
        ("_dmarc.sender.test", "v=DMARC1; p=reject"),
        ("sel._domainkey.sender.test", ed.record()),
        ("spoof.test", "v=spf1 ip4:192.0.2.1 -all"),
        ("_dmarc.spoof.test", "v=DMARC1; p=reject"),
    ])
    mta = Mta(workdir, base_config(workdir, f"""\
dns:
  nameservers: ["127.0.0.1:{dns.port}"]
mail_auth:
  verify: true
""")).start()
    try:
        message = (b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: signed\r\n"
                   b"Authentication-Results: mx.petrel.test; dkim=pass (forged)\r\n"
                   b"\r\nhello\r\n")
        with smtplib.SMTP(mta.host, mta.port, timeout=60) as s:
            s.ehlo("client.sender.test")
            s.sendmail("alice@sender.test", ["bob@example.test"],
                       signed_by_dkimpy(message, ed, "sel", "sender.test"))
            spoof = b"From: ceo@spoof.test\r\nTo: bob@example.test\r\nSubject: pay\r\n\r\nnow\r\n"
            with pytest.raises(smtplib.SMTPDataError) as refused:
                s.sendmail("ceo@spoof.test", ["bob@example.test"], spoof)
            assert refused.value.smtp_code == 550
            assert refused.value.smtp_error.startswith(b"5.7.1")
        files = wait_for(lambda: maildir_files(workdir / "maildir", "bob"), what="delivery")
        assert len(files) == 1, "the spoof was not delivered"
        text = files[0].read_bytes().decode()
        header = text.split("Authentication-Results: mx.petrel.test;", 1)[1].split("\r\nReceived:")[0]
        assert "spf=pass" in header and "dkim=pass" in header and "dmarc=pass" in header, header
        assert "(forged)" not in text, "a forged header claiming our authserv-id is removed"
    finally:
        mta.kill()
        dns.stop()


def test_inbound_checks_can_be_off_for_one_listener(workdir):
    """`inbound_checks: false` on an internal port: the DMARC p=reject spoof the public port
    refuses is accepted there, untagged (no Authentication-Results)."""
    dns = TxtDns(txt=[
        ("spoof.test", "v=spf1 ip4:192.0.2.1 -all"),
        ("_dmarc.spoof.test", "v=DMARC1; p=reject"),
    ])
    config = base_config(workdir, f"""dns:
  nameservers: ["127.0.0.1:{dns.port}"]
mail_auth:
  verify: true
""").replace("listeners:\n  - address: 127.0.0.1:0\n", "listeners:\n  - address: 127.0.0.1:0\n"
             "  - address: 127.0.0.2:0\n    inbound_checks: false\n")
    mta = Mta(workdir, config).start()
    try:
        internal = wait_for(lambda: next((l for l in mta.stdout_lines if "on 127.0.0.2:" in l), None),
                            what="the internal listener")
        internal_port = int(internal.rsplit(":", 1)[1])
        spoof = b"From: ceo@spoof.test\r\nTo: bob@example.test\r\nSubject: pay\r\n\r\nnow\r\n"
        with smtplib.SMTP(mta.host, mta.port, timeout=60) as s:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                s.sendmail("ceo@spoof.test", ["bob@example.test"], spoof)
            assert refused.value.smtp_code == 550
        with smtplib.SMTP("127.0.0.2", internal_port, timeout=60) as s:
            s.sendmail("ceo@spoof.test", ["bob@example.test"], spoof)
        files = wait_for(lambda: maildir_files(workdir / "maildir", "bob"), what="delivery")
        assert len(files) == 1
        assert b"Authentication-Results:" not in files[0].read_bytes()
    finally:
        mta.kill()
        dns.stop()


def test_dnsbl_listed_client_is_refused_naming_the_list(workdir):
    dns = TxtDns(hosts=[("1.0.0.127.bl.test", "127.0.0.2")])
    mta = Mta(workdir, base_config(workdir, f"""\
dns:
  nameservers: ["127.0.0.1:{dns.port}"]
mail_auth:
  dnsbl_zones: [bl.test]
""")).start()
    try:
        with smtplib.SMTP(mta.host, mta.port, timeout=60) as s:
            s.ehlo("c.test")
            s.mail("a@remote.test")
            code, text = s.rcpt("bob@example.test")
            assert code == 554 and b"bl.test" in text, (code, text)
    finally:
        mta.kill()
        dns.stop()


def test_dkim_keys_follow_config_reload(workdir, keys):
    """A selector added by editing the config signs the next message without a restart (key
    rotation relies on it); a config naming an unreadable key is refused whole, and applied
    once the key can be read."""
    from test_reload import swap_config
    rsa, ed = keys
    port = free_port()
    sink = Sink("127.0.0.1", port)
    relay = f"""\
relay:
  client_networks: ["127.0.0.0/8"]
routes:
  - domain: "*"
    smarthost: 127.0.0.1:{port}
    tls: none
"""
    one_key = relay + f"dkim:\n  keys:\n    - {{domain: example.test, selector: ed1, key_file: {ed.path}}}\n"
    two_keys = one_key + f"    - {{domain: example.test, selector: rsa1, key_file: {rsa.path}}}\n"
    mta = Mta(workdir, base_config(workdir, one_key)).start()
    message = b"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: s\r\n\r\nhi\r\n"

    def send_and_count_signatures(n):
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
            s.sendmail("alice@example.test", ["bob@remote.test"], message)
        got = wait_for(lambda: len(sink.messages) >= n and sink.messages, what=f"message {n}")
        return got[n - 1].content.count(b"DKIM-Signature:")

    try:
        assert send_and_count_signatures(1) == 1
        swap_config(mta.config_path, base_config(workdir, two_keys))
        wait_for(lambda: mta.log().count("config reloaded") >= 1, what="reload")
        assert send_and_count_signatures(2) == 2
        broken = two_keys.replace(str(rsa.path), str(workdir / "missing.pem"))
        swap_config(mta.config_path, base_config(workdir, broken))
        wait_for(lambda: "config reload refused" in mta.log(), what="refusal logged")
        assert send_and_count_signatures(3) == 2, "the running keys stay"
        # The key file appears later (a Secret mounted after the ConfigMap): the same file
        # is tried again and applied, without another edit.
        reloads = mta.log().count("config reloaded")
        (workdir / "missing.pem").write_bytes(rsa.path.read_bytes())
        wait_for(lambda: mta.log().count("config reloaded") > reloads, what="retried reload")
        assert mta.log().count("config reload refused") == 1, "refusal logged once"
    finally:
        mta.kill()
        sink.stop()
