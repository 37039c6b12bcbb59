"""An authoritative DNS server for tests: Debian's nsd serving one zone from a file in a
temporary folder, on a given address and an OS-chosen port.

The zone has a SOA (with short TTLs: record TTL and negative-caching TTL of a couple of
seconds, so waiting them out is quick) and one NS whose address is the server's, so a
checker that finds "every authoritative nameserver" through NS and A lookups lands here.
`set_txt` rewrites the zone with a new serial and makes nsd reload it (SIGHUP), then
waits until the new serial is served.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

TTL = 2  # record TTL and SOA MINIMUM, seconds


def _free_port(host):
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
            return port
    raise AssertionError("no port free for both UDP and TCP")


def stop_nsd(proc, workdir, keep_dir=False):
    """Stops an nsd started in its own process group (TERM, then KILL after 10 s) and
    removes its working directory unless asked to keep it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if not keep_dir:
        shutil.rmtree(workdir, ignore_errors=True)


def _quote(text):
    """A TXT value as zone-file character-strings of at most 250 bytes."""
    chunks = [text[i:i + 250] for i in range(0, len(text), 250)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


class Nsd:
    def __init__(self, zone, listen="127.0.0.1"):
        self.binary = shutil.which("nsd") or "/usr/sbin/nsd"
        assert os.path.exists(self.binary), "nsd is not installed (apt-get install nsd)"
        self.zone, self.listen = zone.rstrip("."), listen
        self.dir = Path(tempfile.mkdtemp(prefix="nsd-"))
        self.serial, self.txt = 1, {}
        for _ in range(5):  # the port may be taken between choosing and binding: again
            self.port = _free_port(listen)
            self._write_zone()
            d = self.dir
            (d / "nsd.conf").write_text(
                f"server:\n  ip-address: {listen}\n  port: {self.port}\n  do-ip6: no\n"
                f'  username: ""\n  chroot: ""\n  zonesdir: "{d}"\n  pidfile: "{d}/nsd.pid"\n'
                f'  database: ""\n  xfrdfile: "{d}/xfrd.state"\n  zonelistfile: "{d}/zone.list"\n'
                f'  xfrdir: "{d}"\n  logfile: "{d}/nsd.log"\n  server-count: 1\n  verbosity: 1\n'
                f"remote-control:\n  control-enable: no\n"
                f'zone:\n  name: {self.zone}\n  zonefile: "{d}/zone"\n')
            self.proc = subprocess.Popen([self.binary, "-d", "-c", str(d / "nsd.conf")],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            if self._wait_serial(self.serial, 20):
                return
            self.stop(keep_dir=True)
        raise AssertionError(f"nsd did not start: {self.log()}")

    def log(self):
        p = self.dir / "nsd.log"
        return p.read_text() if p.exists() else ""

    def _write_zone(self):
        z = self.zone
        lines = [f"$ORIGIN {z}.", f"$TTL {TTL}",
                 f"@ {TTL} IN SOA ns1.{z}. hostmaster.{z}. {self.serial} 60 60 600 {TTL}",
                 f"@ IN NS ns1.{z}.", f"ns1 IN A {self.listen}"]
        for name, value in sorted(self.txt.items()):
            lines.append(f"{name}. IN TXT {_quote(value)}")
        path = self.dir / "zone"
        path.write_text("\n".join(lines) + "\n")
        # nsd reloads a zone file whose modification time moved: make sure it did.
        later = time.time() + self.serial
        os.utime(path, (later, later))

    def _serial_served(self):
        import dns.message
        import dns.query
        import dns.rdatatype
        q = dns.message.make_query(self.zone + ".", dns.rdatatype.SOA)
        try:
            r = dns.query.udp(q, self.listen, port=self.port, timeout=1)
        except Exception:
            return None
        for rrset in r.answer:
            for rr in rrset:
                return rr.serial
        return None

    def _wait_serial(self, serial, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self._serial_served() == serial:
                return True
            time.sleep(0.05)
        return False

    def set_txt(self, records):
        """Serves exactly `records` ({owner name: TXT value}) besides SOA/NS/A."""
        records = {k.rstrip("."): v for k, v in records.items()}
        if records == self.txt:
            return
        self.txt = records
        self.serial += 1
        self._write_zone()
        os.kill(self.proc.pid, signal.SIGHUP)
        assert self._wait_serial(self.serial, 30), f"nsd did not load serial {self.serial}: {self.log()}"

    def lookup_txt(self, name):
        """The TXT value served for `name` (strings joined), or None."""
        import dns.message
        import dns.query
        import dns.rdatatype
        q = dns.message.make_query(name.rstrip(".") + ".", dns.rdatatype.TXT)
        r = dns.query.udp(q, self.listen, port=self.port, timeout=2)
        for rrset in r.answer:
            for rr in rrset:
                return b"".join(rr.strings)
        return None

    def stop(self, keep_dir=False):
        stop_nsd(self.proc, self.dir, keep_dir)
