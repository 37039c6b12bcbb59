"""Security over real sockets: STARTTLS/implicit TLS with swaks, smtplib and openssl,
AUTH on submission, the STARTTLS injection case, the open-relay battery, rate limits,
AUTH failure limits, a connection flood, and certificate reload."""

import base64
import hashlib
import shutil
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from conftest import BIN, Mta, maildir_files, wait_for

PASSWORD = "correct horse battery staple"


def security_config(workdir, listeners, extra_smtpd="", relay=""):
    lines = "\n".join(f"  - address: 127.0.0.1:0\n    kind: {k}" for k in listeners)
    return f"""\
hostname: mx.petrel.test
listeners:
{lines}
admin:
  address: 127.0.0.1:0
tls:
  cert_file: {workdir / "tls" / "cert.pem"}
  key_file: {workdir / "tls" / "key.pem"}
  generate_self_signed: true
smtpd:
  auth_users_file: {workdir / "users"}
{extra_smtpd}
spool:
  path: {workdir / "spool"}
{relay}
local_domains:
  - name: example.test
    delivery:
      maildir:
        root: {workdir / "maildir"}
"""


def add_user(workdir, user, *senders):
    args = [str(BIN), "passwd", user, "--file", str(workdir / "users")]
    for s in senders:
        args += ["--sender", s]
    out = subprocess.run(args, input=PASSWORD + "\n", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


class MultiMta(Mta):
    """Remembers every listener address, in config order."""

    def start(self, timeout=60.0):
        super().start(timeout)
        wait_for(lambda: len([l for l in self.stdout_lines if "listening" in l]) >= self.count,
                 what="all listeners")
        self.ports = [int(l.rsplit(":", 1)[1]) for l in self.stdout_lines if "listening" in l]
        return self


def start(workdir, listeners, **kw):
    add_user(workdir, "alice@example.test")
    m = MultiMta(workdir, security_config(workdir, listeners, **kw))
    m.count = len(listeners)
    return m.start()


def insecure_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_starttls_with_smtplib_swaks_and_openssl(workdir):
    mta = start(workdir, ["smtp"])
    try:
        port = mta.ports[0]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            assert s.has_extn("starttls") and not s.has_extn("requiretls")
            assert not s.has_extn("auth"), "no AUTH before TLS"
            code, _ = s.starttls(context=insecure_context())
            assert code == 220
            s.ehlo("client.test")
            assert s.has_extn("requiretls") and s.has_extn("auth")
            assert not s.has_extn("starttls")
            s.sendmail("a@remote.test", ["tls@example.test"], b"Subject: over tls\r\n\r\nhi\r\n")
        files = wait_for(lambda: maildir_files(workdir / "maildir", "tls"), what="delivery")
        assert b"with ESMTPS id" in files[0].read_bytes()

        if shutil.which("swaks"):
            out = subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "--tls",
                                  "--to", "swaks@example.test"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout
            assert "250 2.0.0 Ok: queued" in out.stdout

        out = subprocess.run(["openssl", "s_client", "-starttls", "smtp", "-connect",
                              f"127.0.0.1:{port}", "-brief"],
                             input="QUIT\n", capture_output=True, text=True, timeout=60)
        assert "Protocol version: TLSv1.3" in out.stdout + out.stderr, out.stderr
    finally:
        mta.kill()


def test_submission_requires_tls_then_auth_and_owned_senders(workdir):
    mta = start(workdir, ["submission"])
    try:
        port = mta.ports[0]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            code, text = s.mail("alice@example.test")
            assert (code, text[:5]) == (530, b"5.7.0"), "MAIL before AUTH"
            code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(
                b"\0alice@example.test\0" + PASSWORD.encode()).decode())
            assert (code, text[:6]) == (538, b"5.7.11"), "AUTH before TLS"
            s.starttls(context=insecure_context())
            s.ehlo("client.test")
            s.login("alice@example.test", PASSWORD)  # smtplib picks PLAIN or LOGIN
            code, text = s.mail("mallory@other.test")
            assert (code, text[:5]) == (553, b"5.7.1"), "sender not owned"
            s.rset()
            s.sendmail("alice@example.test", ["friend@remote.test", "bob@example.test"],
                       b"Subject: submitted\r\n\r\nhi\r\n")
        wait_for(lambda: maildir_files(workdir / "maildir", "bob"), what="local delivery")
    finally:
        mta.kill()


def test_auth_login_mechanism_and_swaks_auth(workdir):
    mta = start(workdir, ["submission"])
    try:
        port = mta.ports[0]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.starttls(context=insecure_context())
            s.ehlo("client.test")
            code, _ = s.docmd("AUTH", "LOGIN")
            assert code == 334
            code, _ = s.docmd(base64.b64encode(b"alice@example.test").decode())
            assert code == 334
            code, text = s.docmd(base64.b64encode(PASSWORD.encode()).decode())
            assert (code, text[:5]) == (235, b"2.7.0")
        if shutil.which("swaks"):
            out = subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "--tls",
                                  "--auth", "PLAIN", "--auth-user", "alice@example.test",
                                  "--auth-password", PASSWORD, "--from", "alice@example.test",
                                  "--to", "carol@example.test"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout
            assert PASSWORD not in mta.log(), "passwords never reach logs"
    finally:
        mta.kill()


def test_implicit_tls_smtps(workdir):
    mta = start(workdir, ["smtps"])
    try:
        with smtplib.SMTP_SSL("127.0.0.1", mta.ports[0], timeout=30,
                              context=insecure_context()) as s:
            s.ehlo("client.test")
            s.login("alice@example.test", PASSWORD)
            s.sendmail("alice@example.test", ["dave@example.test"], b"Subject: 465\r\n\r\nhi\r\n")
        files = wait_for(lambda: maildir_files(workdir / "maildir", "dave"), what="delivery")
        assert b"with ESMTPSA id" in files[0].read_bytes()
    finally:
        mta.kill()


def test_starttls_command_injection_is_discarded(workdir):
    mta = start(workdir, ["smtp"])
    try:
        raw = socket.create_connection(("127.0.0.1", mta.ports[0]), timeout=30)
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        # CVE-2011-0411: a command smuggled in the same packet as STARTTLS.
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert f.readline().startswith(b"220 2.0.0")
        tls = insecure_context().wrap_socket(raw, server_hostname="mx.petrel.test")
        tf = tls.makefile("rb")
        tls.sendall(b"NOOP\r\n")
        first = tf.readline()
        assert first.startswith(b"250 2.0.0 Ok"), f"injected command answered: {first!r}"
        tls.sendall(b"MAIL FROM:<a@remote.test>\r\n")
        assert tf.readline().startswith(b"503 5.5.1"), "state reset: EHLO needed again"
        tls.close()
    finally:
        mta.kill()


RELAY_TRICKS = [
    "victim@remote.test",
    "victim%remote.test@example.test",
    "remote.test!victim@example.test",
    "@example.test,@relay.test:victim@remote.test",
    '"victim@remote.test"@example.test',
    "victim@[192.0.2.1]",
    "victim@remote.test.",
    "victim@example.test.",
    "VICTIM@REMOTE.TEST",
    "victim@exämple.test",
    "victim@xn--exmple-cua.test",
    "victim@example.test@remote.test",
]


@pytest.mark.parametrize("authenticated", [False, True])
def test_open_relay_battery(workdir, authenticated):
    add_user(workdir, "other@other.test")
    mta = start(workdir, ["smtp", "submission"], extra_smtpd="  max_errors: 100\n")
    try:
        port = mta.ports[1] if authenticated else mta.ports[0]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            if authenticated:
                # Authenticated as a user of another domain: may not use our addresses.
                s.starttls(context=insecure_context())
                s.ehlo("client.test")
                s.login("other@other.test", PASSWORD)
                code, text = s.mail("alice@example.test")
                assert (code, text[:5]) == (553, b"5.7.1")
                return
            s.command_encoding = "utf-8"  # the IDN variant is sent as UTF-8
            s.mail("sender@remote.test")
            for rcpt in RELAY_TRICKS:
                code, text = s.rcpt(rcpt)
                assert code >= 500, f"{rcpt} was accepted: {code} {text}"
    finally:
        mta.kill()


def test_rate_limit_per_ip(workdir):
    mta = start(workdir, ["smtp"], extra_smtpd="  rate_limits:\n    messages_per_ip: 3/1h\n")
    try:
        with smtplib.SMTP("127.0.0.1", mta.ports[0], timeout=30) as s:
            s.ehlo("client.test")
            for _ in range(3):
                assert s.mail("a@remote.test")[0] == 250
                s.rset()
            code, text = s.mail("a@remote.test")
            assert (code, text[:5]) == (451, b"4.7.1")
    finally:
        mta.kill()


def test_auth_failures_slow_down_then_close(workdir):
    mta = start(workdir, ["submission"])
    try:
        with smtplib.SMTP("127.0.0.1", mta.ports[0], timeout=60) as s:
            s.starttls(context=insecure_context())
            s.ehlo("client.test")
            bad = lambda: s.docmd("AUTH", "PLAIN " + base64.b64encode(
                b"\0alice@example.test\0wrong").decode())
            assert bad()[0] == 535
            assert bad()[0] == 535
            code, _ = bad()
            assert code == 535
            code, text = s.getreply()
            assert (code, text[:5]) == (421, b"4.7.0")
    finally:
        mta.kill()


def test_connection_flood_does_not_starve_others(workdir):
    mta = start(workdir, ["smtp"])
    held = []
    try:
        port = mta.ports[0]
        for _ in range(1000):
            s = socket.socket()
            s.settimeout(30)
            s.connect(("127.0.0.1", port))
            held.append(s)
        admitted = sum(1 for s in held[:60] if s.recv(64).startswith(b"220"))
        assert admitted == 50, "per-IP limit (50) admits exactly that many"
        # An honest client from another address still gets through.
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0)) as c:
            c.ehlo("honest.test")
            c.sendmail("h@remote.test", ["honest@example.test"], b"Subject: x\r\n\r\nhi\r\n")
        wait_for(lambda: maildir_files(workdir / "maildir", "honest"), what="delivery")
    finally:
        for s in held:
            s.close()
        mta.kill()


def peer_fingerprint(port):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"EHLO c.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\n")
        f.readline()
        with insecure_context().wrap_socket(raw, server_hostname="x") as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def test_certificate_files_replaced_are_used_without_restart(workdir):
    mta = start(workdir, ["smtp"])
    try:
        port = mta.ports[0]
        before = peer_fingerprint(port)
        tls_dir = workdir / "tls"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                        "/CN=mx.petrel.test", "-keyout", str(tls_dir / "new-key.pem"),
                        "-out", str(tls_dir / "new-cert.pem")], check=True, capture_output=True)
        (tls_dir / "new-key.pem").rename(tls_dir / "key.pem")
        (tls_dir / "new-cert.pem").rename(tls_dir / "cert.pem")
        after = peer_fingerprint(port)
        assert after != before
        # A broken replacement is refused; the working one stays.
        (tls_dir / "cert.pem").write_text("garbage")
        assert peer_fingerprint(port) == after
        assert "new certificate refused" in mta.log()
    finally:
        mta.kill()
