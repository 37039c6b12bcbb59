"""PROXY protocol on SMTP listeners, with HAProxy (Debian's) as the real peer.

HAProxy runs in TCP mode in front of petrel-mta: one frontend sends the v1 text header
(`send-proxy`), one the v2 binary header (`send-proxy-v2`), and one passes implicit TLS
through with a v2 header. HAProxy listens on sockets this test binds on OS-chosen
loopback ports and hands over (`bind fd@N`), so it is ready as soon as it runs and no
port is guessed. Clients connect from 127.0.0.5 (or .6); HAProxy connects to the MTA from
127.0.0.1, so everything the MTA decides about "the client" shows which address it used.
A raw socket also sends a v2 header built by hand from the spec.
"""

import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
from email.message import EmailMessage

import pytest

from conftest import BIN, Mta, maildir_files, mta_header, wait_for

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if shutil.which("/usr/sbin/haproxy") else None
)
pytestmark = pytest.mark.skipif(
    HAPROXY is None,
    reason="haproxy is not installed (Debian package haproxy; scripts/test.sh installs it)",
)

CLIENT = "127.0.0.5"
OTHER_CLIENT = "127.0.0.6"
PASSWORD = "correct horse battery staple"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class ProxiedMta(Mta):
    """petrel-mta with a `proxy_protocol` smtp listener and smtps listener, in that order."""

    def start(self, timeout=60.0):
        super().start(timeout)
        wait_for(lambda: len(self.listening()) >= 2, what="both listeners")
        self.smtp_port, self.smtps_port = self.listening()[:2]
        return self

    def listening(self):
        return [int(l.rsplit(":", 1)[1]) for l in self.stdout_lines if "listening for SMTP" in l]


def start_mta(workdir, max_connections_per_ip=50):
    users = workdir / "users"
    out = subprocess.run(
        [str(BIN), "passwd", "alice@example.test", "--file", str(users)],
        input=PASSWORD + "\n", capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    text = mta_header(workdir).replace(
        "  - address: 127.0.0.1:0\n",
        "  - address: 127.0.0.1:0\n    proxy_protocol: true\n"
        "  - address: 127.0.0.1:0\n    kind: smtps\n    proxy_protocol: true\n",
    ) + f"""\
tls:
  cert_file: {workdir / "tls" / "cert.pem"}
  key_file: {workdir / "tls" / "key.pem"}
  generate_self_signed: true
smtpd:
  auth_users_file: {users}
  max_connections_per_ip: {max_connections_per_ip}
  # Relay clients are exempt from per-IP limits by default (as Postfix exempts
  # $mynetworks); here CLIENT relays and must still meet the per-IP limit.
  limit_exempt_networks: []
  proxy_header_timeout: 2s
  rate_limits: {{messages_per_ip: "off", recipients_per_ip: "off"}}
relay:
  client_networks: [{CLIENT}/32]
local_domains:
  - name: example.test
    delivery:
      maildir:
        root: {workdir / "maildir"}
"""
    return ProxiedMta(workdir, text).start()


class Haproxy:
    """`haproxy -db` in the foreground, listening on sockets bound here."""

    def __init__(self, workdir, mta):
        self.sockets = {}
        for name in ("v1", "v2", "tls"):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(64)
            self.sockets[name] = s
        fd = {name: s.fileno() for name, s in self.sockets.items()}
        self.port = {name: s.getsockname()[1] for name, s in self.sockets.items()}
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(f"""\
global
    maxconn 200

defaults
    mode tcp
    timeout connect 10s
    timeout client 60s
    timeout server 60s

frontend smtp_v1
    bind fd@{fd["v1"]}
    default_backend mta_v1

frontend smtp_v2
    bind fd@{fd["v2"]}
    default_backend mta_v2

frontend smtps_v2
    bind fd@{fd["tls"]}
    default_backend mta_tls

backend mta_v1
    server mta 127.0.0.1:{mta.smtp_port} send-proxy

backend mta_v2
    server mta 127.0.0.1:{mta.smtp_port} send-proxy-v2

backend mta_tls
    server mta 127.0.0.1:{mta.smtps_port} send-proxy-v2
""")
        check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True,
                               pass_fds=list(fd.values()))
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = open(workdir / "haproxy.log", "wb")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT, pass_fds=list(fd.values()))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        for s in self.sockets.values():
            s.close()
        self.log.close()


@pytest.fixture
def proxied(workdir):
    mta = start_mta(workdir)
    haproxy = Haproxy(workdir, mta)
    yield mta, haproxy
    haproxy.stop()
    mta.kill()


def message(to, subject):
    msg = EmailMessage()
    msg["From"] = "sender@client.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("through the proxy\n")
    return msg


def received_header(workdir, user, subject):
    """The Received: header of the message with `subject` in `user`'s Maildir."""
    def find():
        for path in maildir_files(workdir / "maildir", user):
            data = path.read_bytes()
            if f"Subject: {subject}".encode() in data:
                return data
        return None
    data = wait_for(find, what=f"{subject!r} in {user}'s Maildir")
    head = data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ")
    return next(l for l in head.split(b"\r\n") if l.startswith(b"Received: ")).decode()


def smtp_via(haproxy, frontend, source=CLIENT):
    return smtplib.SMTP("127.0.0.1", haproxy.port[frontend], timeout=30,
                        source_address=(source, 0))


@pytest.mark.parametrize("frontend", ["v1", "v2"])
def test_haproxy_header_carries_the_client_address_into_received(proxied, workdir, frontend):
    _, haproxy = proxied
    subject = f"via haproxy {frontend}"
    with smtp_via(haproxy, frontend) as s:
        s.ehlo("client.test")
        s.send_message(message("bob@example.test", subject))
    received = received_header(workdir, "bob", subject)
    assert f"([{CLIENT}])" in received, received
    assert "127.0.0.1" not in received, received


def test_implicit_tls_reads_the_header_before_the_handshake(proxied, workdir):
    _, haproxy = proxied
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", haproxy.port["tls"], timeout=30, context=context,
                          source_address=(CLIENT, 0)) as s:
        s.login("alice@example.test", PASSWORD)
        s.send_message(message("bob@example.test", "implicit tls"),
                       from_addr="alice@example.test")
    received = received_header(workdir, "bob", "implicit tls")
    assert f"([{CLIENT}])" in received and "ESMTPSA" in received, received


def test_per_ip_limit_and_relay_follow_the_proxied_address(workdir):
    mta = start_mta(workdir, max_connections_per_ip=2)
    haproxy = Haproxy(workdir, mta)
    try:
        held = [smtp_via(haproxy, "v2") for _ in range(2)]
        # Every connection reaches the MTA from HAProxy's 127.0.0.1: only the address in
        # the header tells the third one from CLIENT apart from OTHER_CLIENT's.
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtp_via(haproxy, "v2")
        assert refused.value.smtp_code == 421, refused.value
        other = smtp_via(haproxy, "v1", source=OTHER_CLIENT)

        # relay.client_networks lists CLIENT only.
        for client, code in [(held[0], 250), (other, 550)]:
            client.ehlo("client.test")
            client.mail("sender@client.test")
            assert client.rcpt("someone@remote.test")[0] == code
            client.rset()
        for client in held + [other]:
            client.quit()
    finally:
        haproxy.stop()
        mta.kill()


def test_plain_client_is_dropped_while_proxied_sessions_go_on(proxied, workdir):
    mta, haproxy = proxied
    with smtp_via(haproxy, "v2") as proxied_session:
        proxied_session.ehlo("client.test")

        # Straight to the MTA, no header: an SMTP client's first command is refused as a
        # header and the connection closed without a greeting...
        with socket.create_connection(("127.0.0.1", mta.smtp_port), timeout=30) as plain:
            plain.sendall(b"EHLO plain.test\r\n")
            try:
                assert plain.recv(1024) == b""
            except ConnectionResetError:
                pass
        # ...and one that waits for a greeting is closed after proxy_header_timeout.
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=30)
        wait_for(lambda: "no valid PROXY header" in mta.log()
                 and "no complete PROXY header" in mta.log(), what="both drops logged")

        proxied_session.send_message(message("bob@example.test", "still here"))
    received = received_header(workdir, "bob", "still here")
    assert f"([{CLIENT}])" in received, received


class HeaderSMTP(smtplib.SMTP):
    """smtplib with a PROXY header sent on the socket before anything else."""

    def __init__(self, header, *args, **kwargs):
        self.proxy_header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self.proxy_header)
        return sock


def v2_header(command, family, addresses, tlvs=b""):
    """proxy-protocol.txt §2.2: signature, version 2 + command, family + protocol,
    big-endian length of what follows, addresses, TLVs."""
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def test_hand_built_v2_header_from_a_raw_socket(proxied, workdir):
    mta, _ = proxied
    # PROXY, TCP over IPv4: 192.0.2.44:40001 -> 127.0.0.1:25, then a PP2_TYPE_AUTHORITY
    # TLV (0x02) that the MTA must skip.
    addresses = socket.inet_aton("192.0.2.44") + socket.inet_aton("127.0.0.1") \
        + struct.pack("!HH", 40001, 25)
    authority = b"mx.petrel.test"
    tlv = bytes([0x02]) + struct.pack("!H", len(authority)) + authority
    header = v2_header(0x1, 0x11, addresses, tlv)
    with HeaderSMTP(header, "127.0.0.1", mta.smtp_port, timeout=30) as s:
        s.send_message(message("bob@example.test", "hand built v2"))
    assert "([192.0.2.44])" in received_header(workdir, "bob", "hand built v2")

    # LOCAL (what a proxy's health check sends): the socket's own address stands.
    with HeaderSMTP(v2_header(0x0, 0x00, b""), "127.0.0.1", mta.smtp_port, timeout=30) as s:
        s.send_message(message("bob@example.test", "v2 local"))
    assert "([127.0.0.1])" in received_header(workdir, "bob", "v2 local")
