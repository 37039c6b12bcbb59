"""Really signed DNS for tests: a private root, a secure zone, an unsigned zone and a bogus
zone, signed at test time with Debian's ldnsutils (`ldns-keygen`, `ldns-signzone`) and
served by nsd on loopback; `delv` (bind9-dnsutils) is the independent validator that says
what each answer is (secure, insecure, bogus).

    .               private root, signed; its key is the trust anchor (two files: the
                    DNSKEY line hickory reads, and the `trust-anchors` clause delv reads)
    test.           signed, DS in the root: secure
    unsigned.test.  delegated from test. without DS: insecure
    bogus.test.     signed, but test. publishes a DS for another key: bogus

One nsd serves all four zones on `listen` and an OS-chosen port; it answers each name from
the most specific zone it holds, so a stub resolver pointed at it (the MTA's, delv) gets
every record, signature, DS and NSEC a validator needs. `Front` is a UDP/TCP relay in
front of nsd that answers SERVFAIL for chosen names, everything else unchanged.

Nothing here sleeps to synchronise: nsd is polled until it serves the root SOA.
"""

import os
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from nsd import _free_port, stop_nsd

TTL = 300
ZONES = (".", "test.", "unsigned.test.", "bogus.test.")


def have_tools():
    """Whether ldnsutils, delv and nsd are installed (scripts/test.sh installs them)."""
    return all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}")
               for t in ("ldns-keygen", "ldns-signzone", "delv", "nsd"))


def missing(what):
    """Skips the calling test (or module) because `what` is not installed; under CI
    (CI=true), where scripts/test.sh installs every tool, a missing one fails instead, so
    the DANE and TLS-RPT tests cannot pass by not running."""
    import pytest
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} missing under CI (scripts/test.sh installs it)", pytrace=False)
    pytest.skip(f"{what} missing", allow_module_level=True)


def _run(args, cwd):
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


class SignedDns:
    """Signs and serves the four zones. `records` maps "test.", "unsigned.test." and
    "bogus.test." to zone-file lines with absolute owner names, e.g.
    `"mx.a.test. IN A 127.0.0.61"`."""

    def __init__(self, records, listen="127.0.0.60"):
        self.binary = shutil.which("nsd") or "/usr/sbin/nsd"
        self.listen = listen
        self.dir = Path(tempfile.mkdtemp(prefix="dnssec-"))
        self.keys = {zone: self._keygen(zone) for zone in ZONES}
        self.keys["wrong"] = self._keygen("bogus.test.")  # its DS goes in test., unused
        self._write_zones(records)
        self._write_anchors()
        for _ in range(5):  # the port may be taken between choosing and binding: again
            self.port = _free_port(listen)
            self._start()
            if self._wait_serving(30):
                return
            self.stop(keep_dir=True)
        raise AssertionError(f"nsd did not start: {self.log()}")

    # --- keys and zones ------------------------------------------------------------------

    def _keygen(self, zone):
        """One ECDSA P-256 key with the SEP flag (257) signing the whole zone."""
        stem = _run(["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", zone], self.dir).strip()
        return self.dir / stem

    def _ds(self, key):
        return Path(f"{key}.ds").read_text().split(";")[0].strip()

    def _write_zones(self, records):
        ns = f"ns.test. {TTL} IN A {self.listen}"
        soa = "{z} {t} IN SOA ns.test. hostmaster.test. 1 60 60 600 60\n{z} {t} IN NS ns.test."
        zones = {
            ".": [soa.format(z=".", t=TTL), f"test. {TTL} IN NS ns.test.",
                  self._ds(self.keys["test."]), ns],
            "test.": [soa.format(z="test.", t=TTL), ns,
                      f"unsigned.test. {TTL} IN NS ns.test.",
                      f"bogus.test. {TTL} IN NS ns.test.", self._ds(self.keys["wrong"])],
            "unsigned.test.": [soa.format(z="unsigned.test.", t=TTL)],
            "bogus.test.": [soa.format(z="bogus.test.", t=TTL)],
        }
        for zone, lines in records.items():
            zones[zone] += lines
        for zone, lines in zones.items():
            path = self._zone_path(zone)
            path.write_text(f"$TTL {TTL}\n" + "\n".join(lines) + "\n")
            if zone == "unsigned.test.":
                continue
            # Valid from a day ago (no clock-skew surprises) for four weeks.
            inception = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() - 86400))
            _run(["ldns-signzone", "-i", inception, "-o", zone, str(path),
                  str(self.keys[zone])], self.dir)

    def _zone_path(self, zone):
        return self.dir / ("root.zone" if zone == "." else f"{zone}zone")

    def _served_file(self, zone):
        path = self._zone_path(zone)
        return path if zone == "unsigned.test." else Path(f"{path}.signed")

    def _write_anchors(self):
        line = Path(f"{self.keys['.']}.key").read_text().split(";")[0].strip()
        self.anchor_file = self.dir / "root.anchor"  # hickory: the DNSKEY record
        self.anchor_file.write_text(line + "\n")
        _, _, _, flags, proto, alg, key = line.split(None, 6)
        self.delv_anchor_file = self.dir / "root.delv-anchor"
        self.delv_anchor_file.write_text(
            f'trust-anchors {{ . static-key {flags} {proto} {alg} "{key}"; }};\n')

    # --- nsd -----------------------------------------------------------------------------

    def _start(self):
        d = self.dir
        zones = "".join(f'zone:\n  name: "{z}"\n  zonefile: "{self._served_file(z)}"\n'
                        for z in ZONES)
        (d / "nsd.conf").write_text(
            f"server:\n  ip-address: {self.listen}\n  port: {self.port}\n  do-ip6: no\n"
            f'  username: ""\n  chroot: ""\n  zonesdir: "{d}"\n  pidfile: "{d}/nsd.pid"\n'
            f'  database: ""\n  xfrdfile: "{d}/xfrd.state"\n  zonelistfile: "{d}/zone.list"\n'
            f'  xfrdir: "{d}"\n  logfile: "{d}/nsd.log"\n  server-count: 1\n  verbosity: 1\n'
            f"remote-control:\n  control-enable: no\n" + zones)
        self.proc = subprocess.Popen([self.binary, "-d", "-c", str(d / "nsd.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def _wait_serving(self, timeout):
        import dns.message
        import dns.query
        import dns.rdatatype
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                q = dns.message.make_query("bogus.test.", dns.rdatatype.SOA)
                r = dns.query.udp(q, self.listen, port=self.port, timeout=1)
                if r.answer:
                    return True
            except Exception:
                pass
            time.sleep(0.05)
        return False

    def log(self):
        p = self.dir / "nsd.log"
        return p.read_text() if p.exists() else ""

    # --- the independent validator -----------------------------------------------------

    def delv(self, name, rtype, port=None):
        """delv's verdict on `name`/`rtype` asked at this server (or a `Front` on `port`)
        with the private root as the only trust anchor: "secure", "insecure", "bogus",
        "servfail", or the raw output when it is none of those."""
        done = subprocess.run(
            ["delv", "@" + self.listen, "-p", str(port or self.port), "-a",
             str(self.delv_anchor_file), "+root=.", "+tcp", name, rtype],
            capture_output=True, text=True, timeout=60)
        out = done.stdout + done.stderr
        # An answer through a CNAME has a verdict per RRset: the weakest one counts.
        if "no valid" in out or "broken trust chain" in out or "insecurity proof failed" in out:
            return "bogus"
        if "SERVFAIL" in out or "resolution failed: failure" in out:
            return "servfail"
        if "unsigned answer" in out:
            return "insecure"
        if "fully validated" in out:
            return "secure"
        return out

    def stop(self, keep_dir=False):
        stop_nsd(self.proc, self.dir, keep_dir)


class Front:
    """A DNS relay (UDP and TCP, one OS-chosen port on `listen`) to `upstream` (host,
    port): queries for a (name, type) in `servfail` get SERVFAIL, the rest are passed on
    and their answers returned unchanged."""

    def __init__(self, upstream, servfail=(), listen="127.0.0.60"):
        self.upstream = upstream
        self.servfail = {(n.lower().rstrip(".") + ".", t.upper()) for n, t in servfail}
        self.servfails = 0
        front = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self):
                data, sock = self.request
                answer = front._answer(data, tcp=False)
                if answer:
                    sock.sendto(answer, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self):
                while True:
                    head = self.rfile.read(2)
                    if len(head) < 2:
                        return
                    data = self.rfile.read(int.from_bytes(head, "big"))
                    answer = front._answer(data, tcp=True)
                    if not answer:
                        return
                    self.wfile.write(len(answer).to_bytes(2, "big") + answer)

        for _ in range(20):
            port = _free_port(listen)
            try:
                self.udp = socketserver.ThreadingUDPServer((listen, port), Udp)
            except OSError:
                continue
            try:
                self.tcp = socketserver.ThreadingTCPServer((listen, port), Tcp)
            except OSError:
                self.udp.server_close()
                continue
            break
        else:
            raise AssertionError("no port for the DNS front")
        self.udp.daemon_threads = self.tcp.daemon_threads = True
        self.listen, self.port = listen, port
        for server in (self.udp, self.tcp):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def _answer(self, data, tcp):
        import dns.message
        import dns.rcode
        import dns.rdatatype
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None
        question = query.question[0] if query.question else None
        if question is not None and (question.name.to_text().lower(),
                                     dns.rdatatype.to_text(question.rdtype)) in self.servfail:
            self.servfails += 1
            answer = dns.message.make_response(query)
            answer.set_rcode(dns.rcode.SERVFAIL)
            return answer.to_wire()
        host, port = self.upstream
        try:
            if tcp:
                with socket.create_connection((host, port), timeout=10) as up:
                    up.sendall(len(data).to_bytes(2, "big") + data)
                    stream = up.makefile("rb")
                    size = int.from_bytes(stream.read(2), "big")
                    return stream.read(size)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
                up.settimeout(10)
                up.sendto(data, (host, port))
                return up.recvfrom(65535)[0]
        except Exception:
            return None

    def stop(self):
        for server in (self.udp, self.tcp):
            server.shutdown()
            server.server_close()
