"""Helpers for outbound tests: a real DNS server (dnsmasq) on loopback serving test zones,
and aiosmtpd sinks on loopback addresses acting as MX hosts."""

import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller


def free_port(kind=socket.SOCK_STREAM, host="127.0.0.1"):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def txt_arg(name, text):
    """dnsmasq's --txt-record for `text`, split into 250-byte character-strings (RFC 1035
    §3.3 allows 255 per string; verifiers concatenate them, RFC 6376 §3.6.2.2). dnsmasq
    separates the strings with commas, so a record may not contain one."""
    assert "," not in text, text
    chunks = [text[i:i + 250] for i in range(0, len(text), 250)] or [""]
    return f"--txt-record={name}," + ",".join(chunks)


class Dns:
    """dnsmasq answering only from its command line; NXDOMAIN for other names in the
    `local` domains (.test by default). Listens on `listen` (loopback by default)."""

    def __init__(self, mx=(), hosts=(), txt=(), listen="127.0.0.1", local=("test",), port=None):
        self.listen, self.local = listen, local
        for _ in range(10):  # the OS-chosen UDP port may be taken for TCP: pick again
            if self._start(mx, hosts, txt, port):
                return
            if port is not None:
                break
        raise AssertionError("dnsmasq could not get a port")

    def _start(self, mx, hosts, txt, port):
        import dns.resolver
        self.port = port or free_port(socket.SOCK_DGRAM, self.listen)
        args = ["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--log-queries",
                f"--port={self.port}", f"--listen-address={self.listen}", "--bind-interfaces",
                "--cache-size=0"] + [f"--local=/{d}/" for d in self.local]
        args += [f"--mx-host={domain},{host},{pref}" for domain, host, pref in mx]
        args += [f"--host-record={name},{ip}" for name, ip in hosts]
        args += [txt_arg(name, text) for name, text in txt]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:  # wait until it answers
            r = dns.resolver.Resolver(configure=False)
            r.nameservers, r.port, r.lifetime = [self.listen], self.port, 1
            try:
                r.resolve(f"probe.{self.local[0]}", "A")
            except dns.resolver.NXDOMAIN:
                return True
            except Exception:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read()
                    if b"Address already in use" in err:
                        return False
                    raise AssertionError(f"dnsmasq did not start: {err}")
                if time.monotonic() > deadline:
                    raise AssertionError("dnsmasq did not answer")
                time.sleep(0.05)

    def stop(self):
        self.proc.kill()
        self.proc.wait(10)


class FlakyDns:
    """A UDP DNS front for a real server (dnsmasq): while `broken`, every query gets
    SERVFAIL (dnspython builds the answer); otherwise queries are passed to `upstream`
    and its answers passed back unchanged."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.broken = True
        self.servfails = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        import dns.message
        import dns.rcode
        while self.running:
            try:
                query, client = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            if self.broken:
                answer = dns.message.make_response(dns.message.from_wire(query))
                answer.set_rcode(dns.rcode.SERVFAIL)
                self.servfails += 1
                self.sock.sendto(answer.to_wire(), client)
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
                up.settimeout(5)
                up.sendto(query, ("127.0.0.1", self.upstream_port))
                try:
                    self.sock.sendto(up.recvfrom(65535)[0], client)
                except socket.timeout:
                    pass

    def stop(self):
        self.running = False
        self.thread.join(5)
        self.sock.close()


@dataclass
class Received:
    peer: tuple
    sender: str
    recipients: list
    content: bytes
    mail_options: list = field(default_factory=list)
    rcpt_options: list = field(default_factory=list)


class SinkHandler:
    """Accepts mail; optionally answers RCPT with `rcpt_reply` for the first `times`
    attempts (None = always), then accepts."""

    def __init__(self, rcpt_reply=None, times=None):
        self.rcpt_reply = rcpt_reply
        self.times = times
        self.refusals = 0
        self.messages = []
        self.sessions = set()
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            self.sessions.add(id(session))
            refuse = self.rcpt_reply and (self.times is None or self.refusals < self.times)
            if refuse:
                self.refusals += 1
        if refuse:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append(Received(session.peer, envelope.mail_from,
                                          list(envelope.rcpt_tos), envelope.original_content,
                                          list(envelope.mail_options),
                                          list(envelope.rcpt_options)))
        return "250 2.0.0 accepted by sink"


class Sink:
    def __init__(self, host, port, **behaviour):
        self.handler = SinkHandler(**behaviour)
        self.controller = Controller(self.handler, hostname=host, port=port,
                                     decode_data=False, enable_SMTPUTF8=True)
        self.controller.start()

    @property
    def messages(self):
        with self.handler.lock:
            return list(self.handler.messages)

    def stop(self):
        self.controller.stop()
