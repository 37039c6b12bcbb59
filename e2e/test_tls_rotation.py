"""Issue 15 (TLS): a renewed certificate is served without a restart and without one failed
handshake, and a half-written pair is refused.

The MTA's certificate and key live in a directory laid out exactly as the kubelet lays
out a Secret volume, and are swapped the way the kubelet swaps them (AtomicWriter): a new
timestamped folder `..2026_11_30_13_41_52.123456789/`, a `..data_tmp` symlink to it
renamed over `..data` in one `rename(2)`, then the old folder removed. The names the MTA
is given, `tls.crt` and `tls.key`, are symlinks to `..data/tls.crt` and `..data/tls.key`
that never change. Meanwhile a client thread performs STARTTLS handshakes back to back
(Python's ssl, no verification) and records the serial of each certificate it is served.
"""

import datetime
import os
import random
import re
import shutil
import smtplib
import ssl
import threading
import time
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import Mta, mta_header, wait_for

REFUSAL_LINE = "tls: new certificate refused; keeping the old one"


class Pair:
    """A self-signed certificate for mx.petrel.test and its key (PEM), with a serial of
    its own and the notAfter asked for."""

    def __init__(self, days, key=None):
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        self.not_after = now + datetime.timedelta(days=days)
        self.serial = x509.random_serial_number()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.petrel.test")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(self.serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(self.not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.petrel.test")]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, key=None):
        return (key or self.key).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


class SecretVolume:
    """A directory written the way the kubelet writes a Secret volume (its AtomicWriter)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.current = None

    def publish(self, files):
        """Writes `files` ({name: bytes}) as the volume's new content; returns the
        monotonic time just after the switch (the rename of `..data`)."""
        stamp = datetime.datetime.now().strftime("..%Y_%m_%d_%H_%M_%S.")
        folder = f"{stamp}{random.randrange(10**9):09d}"
        (self.root / folder).mkdir()
        for name, data in files.items():
            path = self.root / folder / name
            path.write_bytes(data)
            os.chmod(path, 0o644)  # the default defaultMode (420)
        os.symlink(folder, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", self.root / "..data")
        switched = time.monotonic()
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if self.current is not None:
            shutil.rmtree(self.root / self.current)
        self.current = folder
        return switched


class Handshaker(threading.Thread):
    """STARTTLS handshakes back to back; records (start, end, serial) or (start, error)."""

    def __init__(self, host, port):
        super().__init__(daemon=True)
        self.host, self.port = host, port
        self.served = []
        self.failures = []
        self.stop = threading.Event()
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE

    def run(self):
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                with smtplib.SMTP(self.host, self.port, timeout=10) as smtp:
                    smtp.ehlo("client.test")
                    smtp.starttls(context=self.context)
                    der = smtp.sock.getpeercert(binary_form=True)
                    smtp.ehlo("client.test")
                serial = x509.load_der_x509_certificate(der).serial_number
                self.served.append((start, time.monotonic(), serial))
            except Exception as e:  # every failure counts, whatever it is
                self.failures.append((start, repr(e)))

    def started_after(self, t):
        return [serial for start, _, serial in list(self.served) if start >= t]

    def first_served(self, serial, after):
        """When a handshake that started after `after` first ended with `serial`."""
        return next((end for start, end, s in list(self.served)
                     if start >= after and s == serial), None)


def metrics(mta):
    line = wait_for(lambda: next((l for l in mta.stdout_lines if "/readyz on http://" in l),
                                 None), what="the HTTP endpoint line")
    base = line.rsplit(" on ", 1)[1]
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        return r.read().decode()


def sample(text, series):
    m = re.search("^" + re.escape(series) + r" (\S+)$", text, re.MULTILINE)
    assert m, f"no {series} in\n{text}"
    return float(m.group(1))


# Handshakes waited for in each phase (with the first pair, after each swap).
PER_PHASE = 100
EXPIRY = "petrel_mta_tls_certificate_expiry_seconds"
REFUSED = 'petrel_mta_tls_reloads_total{result="refused"}'
LOADED = 'petrel_mta_tls_reloads_total{result="loaded"}'


def test_kubelet_style_swaps_under_handshakes(workdir):
    volume = SecretVolume(workdir / "tls")
    first = Pair(days=60)
    volume.publish({"tls.crt": first.cert_pem, "tls.key": first.key_pem()})
    assert os.readlink(volume.root / "tls.crt") == "..data/tls.crt"
    assert os.readlink(volume.root / "..data").startswith("..20")

    text = mta_header(workdir) + f"""\
http:
  address: 127.0.0.1:0
tls:
  cert_file: {volume.root / "tls.crt"}
  key_file: {volume.root / "tls.key"}
"""
    mta = Mta(workdir, text).start()
    client = Handshaker(mta.host, mta.port)
    try:
        assert sample(metrics(mta), EXPIRY) == first.not_after.timestamp()
        client.start()
        wait_for(lambda: len(client.served) >= PER_PHASE, what="handshakes with the first pair")
        assert set(client.started_after(0)) == {first.serial}

        # 1. A renewed pair: served within 2 s of the rename, and by every handshake
        #    that started after it.
        renewed = Pair(days=90)
        t1 = volume.publish({"tls.crt": renewed.cert_pem, "tls.key": renewed.key_pem()})
        seen = wait_for(lambda: client.first_served(renewed.serial, t1), timeout=10,
                        interval=0.01, what="the renewed certificate served")
        delays = [seen - t1]
        assert seen - t1 < 2.0, f"renewed certificate served {seen - t1:.3f}s after the rename"
        wait_for(lambda: len(client.started_after(t1)) >= PER_PHASE,
                 what="handshakes after renewal")
        assert set(client.started_after(t1)) == {renewed.serial}
        text = metrics(mta)
        assert sample(text, EXPIRY) == renewed.not_after.timestamp()
        assert sample(text, LOADED) == 1
        refused_before = sample(text, REFUSED)
        assert refused_before == 0
        assert REFUSAL_LINE not in mta.log()

        # 2. A half-written pair (a new certificate, a key from elsewhere): refused, the
        #    renewed pair stays in use, with a log line and a metric.
        broken = Pair(days=120)
        stranger = ec.generate_private_key(ec.SECP256R1())
        t2 = volume.publish({"tls.crt": broken.cert_pem, "tls.key": broken.key_pem(stranger)})
        wait_for(lambda: len(client.started_after(t2)) >= PER_PHASE,
                 what="handshakes after the bad swap")
        assert set(client.started_after(t2)) == {renewed.serial}
        text = wait_for(lambda: (t := metrics(mta)) and sample(t, REFUSED) == refused_before + 1
                        and t, timeout=10, what="the refusal counted")
        assert sample(text, EXPIRY) == renewed.not_after.timestamp()
        assert sample(text, LOADED) == 1
        refusals = [l for l in mta.log().splitlines() if REFUSAL_LINE in l]
        assert len(refusals) == 1, refusals
        assert "does not belong to the certificate" in refusals[0], refusals[0]

        # 3. A good pair again: taken as in 1.
        good = Pair(days=150)
        t3 = volume.publish({"tls.crt": good.cert_pem, "tls.key": good.key_pem()})
        seen = wait_for(lambda: client.first_served(good.serial, t3), timeout=10,
                        interval=0.01, what="the good certificate served")
        delays.append(seen - t3)
        assert seen - t3 < 2.0, f"good certificate served {seen - t3:.3f}s after the rename"
        wait_for(lambda: len(client.started_after(t3)) >= PER_PHASE,
                 what="handshakes after the fix")
        assert set(client.started_after(t3)) == {good.serial}
        text = metrics(mta)
        assert sample(text, EXPIRY) == good.not_after.timestamp()
        assert sample(text, LOADED) == 2
        assert sample(text, REFUSED) == refused_before + 1
    finally:
        client.stop.set()
        client.join(timeout=30)
        mta.kill()

    # 0 failed handshakes over the whole run.
    assert client.failures == [], client.failures[:5]
    served = len(client.served)
    print(f"\n[tls-rotation] {served} STARTTLS handshakes, 0 failed; "
          f"{len(set(s for _, _, s in client.served))} certificates served; new serial "
          f"served {', '.join(f'{d * 1000:.0f} ms' for d in delays)} after the renames")
    assert served >= 4 * PER_PHASE, served
