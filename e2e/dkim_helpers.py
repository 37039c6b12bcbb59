"""Helpers for the DKIM interop tests: key pairs made by openssl, mta-auth's example
binaries (dkim_sign, auth_verify) built once, and dnsmasq serving TXT records on loopback.
"""

import base64
import json
import os
import subprocess
from pathlib import Path

from outbound import Dns

ROOT = Path(__file__).resolve().parent.parent


def example_binary(name):
    """Builds mta-auth's example `name` (no-op when up to date) and returns its path.

    Asks cargo for the path (JSON build messages), so CARGO_TARGET_DIR is honoured."""
    out = subprocess.run(
        ["cargo", "build", "-q", "-p", "mta-auth", "--example", name,
         "--message-format=json"],
        cwd=ROOT, check=True, stdout=subprocess.PIPE,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and \
                msg["target"]["name"] == name:
            return Path(msg["executable"])
    raise AssertionError(f"cargo did not report the {name} executable")


class KeyPair:
    """A private key file made by openssl, and its DKIM public key (`p=` value)."""

    def __init__(self, directory, algorithm, pkcs1=False):
        self.algorithm = algorithm
        self.path = Path(directory) / f"{algorithm}{'-pkcs1' if pkcs1 else ''}.pem"
        if algorithm == "rsa":
            args = ["openssl", "genrsa", "-out", str(self.path)]
            if pkcs1:
                args.insert(2, "-traditional")
            subprocess.run(args + ["2048"], check=True, capture_output=True)
        elif algorithm == "ed25519":
            subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out",
                            str(self.path)], check=True, capture_output=True)
        else:
            raise ValueError(algorithm)
        spki = subprocess.run(
            ["openssl", "pkey", "-in", str(self.path), "-pubout", "-outform", "DER"],
            check=True, capture_output=True).stdout
        # RFC 6376 §3.6.1: RSA p= is the SubjectPublicKeyInfo; RFC 8463 §4: Ed25519 p= is
        # the raw 32-byte key (the last 32 bytes of its SubjectPublicKeyInfo).
        raw = spki if algorithm == "rsa" else spki[-32:]
        self.public_b64 = base64.b64encode(raw).decode()

    @property
    def k(self):
        return self.algorithm

    def record(self):
        return f"v=DKIM1; k={self.k}; p={self.public_b64}"

    def private_b64_for_dkimpy(self):
        """What dkimpy's sign() wants as `privkey`: PEM for RSA, base64 seed for Ed25519."""
        if self.algorithm == "rsa":
            return self.path.read_bytes()
        der = subprocess.run(["openssl", "pkey", "-in", str(self.path), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        return base64.b64encode(der[-32:])


def txt_dnsfunc(records):
    """A dkimpy `dnsfunc` answering from `records` ({name: txt}), names without the
    trailing dot; unknown names have no TXT record."""

    def lookup(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        value = records.get(name.rstrip(".").lower())
        return value.encode() if value is not None else None

    return lookup


class TxtDns(Dns):
    """dnsmasq on 127.0.0.1 answering TXT (and A) records from its command line only;
    NXDOMAIN for every other name under .test."""

    def __init__(self, txt=(), hosts=()):
        super().__init__(hosts=hosts, txt=txt)

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"
