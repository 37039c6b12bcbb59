"""DKIM interop (issue 8): mta-auth's signatures checked by dkimpy, an independent
verifier, for RSA-2048 and Ed25519, with 8-bit bodies, long lines and folded headers; and
messages signed by dkimpy checked by mta-auth's verifier against a real DNS server
(dnsmasq on loopback).

Keys are made by openssl for each run. Our signer runs as the `dkim_sign` example binary
and our verifier as `auth_verify` (both in mta/auth/examples).
"""

import re
import subprocess

import dkim
import pytest

from dkim_helpers import KeyPair, TxtDns, example_binary, txt_dnsfunc

DOMAIN = "example.test"

try:
    import nacl  # noqa: F401  (dkimpy needs PyNaCl for ed25519)
except ImportError:  # pragma: no cover
    raise AssertionError("dkimpy needs PyNaCl for Ed25519: pip install pynacl")

PLAIN = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: plain\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <plain@example.test>\r\n"
    b"\r\n"
    b"Hello.\r\n"
)

EIGHT_BIT = (
    "From: =?utf-8?q?J=C3=BCrgen?= <juergen@example.test>\r\n"
    "To: Zoë <zoe@example.org>\r\n"
    "Subject: Grüße aus Köln — 日本語の件名\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Grüße, naïve café, 日本語, emoji 📬.\r\n"
    "Trailing spaces and tabs \t \r\n"
    "\r\n"
    "\r\n"
).encode("utf-8")

LONG_LINES = (
    b"From: alice@example.test\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: " + b"long subject " * 40 + b"\r\n"
    b"X-Long: " + b"x" * 2000 + b"\r\n"
    b"\r\n"
    + b"A" * 990 + b"\r\n"
    + (b"0123456789 " * 900) + b"\r\n"
    b"end\r\n"
)

FOLDED = (
    b"From: \"Alice Example\"\r\n"
    b"  <alice@example.test>\r\n"
    b"To: bob@example.org,\r\n"
    b"\tcarol@example.org,\r\n"
    b"   dave@example.org\r\n"
    b"Cc: erin@example.org\r\n"
    b"Subject: a subject   that is\r\n"
    b"\tfolded    over\r\n"
    b" three lines\r\n"
    b"Message-ID:\r\n <folded@example.test>\r\n"
    b"\r\n"
    b"Body with    internal   white space.\r\n"
)

MESSAGES = {"plain": PLAIN, "8bit": EIGHT_BIT, "long-lines": LONG_LINES, "folded": FOLDED}


@pytest.fixture(scope="module")
def dkim_sign():
    return example_binary("dkim_sign")


@pytest.fixture(scope="module")
def auth_verify():
    return example_binary("auth_verify")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {
        "rsa": KeyPair(d, "rsa"),
        "rsa-pkcs1": KeyPair(d, "rsa", pkcs1=True),
        "ed25519": KeyPair(d, "ed25519"),
    }


def sign(binary, message, *keys_and_selectors, domain=DOMAIN):
    args = [str(binary), domain]
    for key, selector in keys_and_selectors:
        args += [str(key.path), selector]
    return subprocess.run(args, input=message, check=True, capture_output=True).stdout


def records(*keys_and_selectors, domain=DOMAIN):
    return {f"{sel}._domainkey.{domain}": key.record() for key, sel in keys_and_selectors}


@pytest.mark.parametrize("name", MESSAGES)
@pytest.mark.parametrize("algorithm", ["rsa", "rsa-pkcs1", "ed25519"])
def test_our_signature_verifies_in_dkimpy(dkim_sign, keys, algorithm, name):
    key = keys[algorithm]
    signed = sign(dkim_sign, MESSAGES[name], (key, "sel"))
    expected_a = b"a=ed25519-sha256" if algorithm == "ed25519" else b"a=rsa-sha256"
    assert expected_a in signed.split(b"\r\n\r\n", 1)[0]
    assert dkim.verify(signed, dnsfunc=txt_dnsfunc(records((key, "sel"))))


def test_our_public_record_matches_openssl(dkim_sign, keys):
    for key in keys.values():
        out = subprocess.run([str(dkim_sign), "--record", DOMAIN, str(key.path), "sel"],
                             check=True, capture_output=True, text=True).stdout.strip()
        assert out == key.record()


def test_rotation_both_selectors_verify(dkim_sign, keys):
    """Two active selectors (RSA and Ed25519) sign one message; each verifies alone."""
    pairs = ((keys["rsa"], "2024a"), (keys["ed25519"], "2024b"))
    signed = sign(dkim_sign, EIGHT_BIT, *pairs)
    assert signed.count(b"DKIM-Signature:") == 2
    d = dkim.DKIM(signed)
    dnsfunc = txt_dnsfunc(records(*pairs))
    assert d.verify(idx=0, dnsfunc=dnsfunc)
    assert d.verify(idx=1, dnsfunc=dnsfunc)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_dkimpy_detects_tampering(dkim_sign, keys, algorithm):
    """The positive results above mean something: changes dkimpy must catch do fail."""
    key = keys[algorithm]
    dnsfunc = txt_dnsfunc(records((key, "sel")))
    signed = sign(dkim_sign, PLAIN, (key, "sel"))
    assert not dkim.verify(signed.replace(b"Hello.", b"Hallo."), dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"Subject: plain", b"Subject: plane"),
                           dnsfunc=dnsfunc)
    # From is over-signed: a second From added in transit breaks the signature.
    forged = signed.replace(b"From: Alice", b"From: mallory@evil.test\r\nFrom: Alice", 1)
    assert not dkim.verify(forged, dnsfunc=dnsfunc)


def test_relaxed_canonicalisation_survives_refolding(dkim_sign, keys):
    key = keys["rsa"]
    signed = sign(dkim_sign, FOLDED, (key, "sel"))
    refolded = signed.replace(b"Cc: erin@example.org", b"Cc:   erin@example.org   ")
    refolded = refolded.replace(b"internal   white", b"internal white")
    assert refolded != signed
    assert dkim.verify(refolded, dnsfunc=txt_dnsfunc(records((key, "sel"))))


# --- the other direction: dkimpy signs, our verifier checks against real DNS ---------------

def dkimpy_sign(message, key, selector, domain=DOMAIN):
    signature = dkim.sign(
        message, selector.encode(), domain.encode(), key.private_b64_for_dkimpy(),
        signature_algorithm=b"ed25519-sha256" if key.algorithm == "ed25519"
        else b"rsa-sha256",
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return signature + message


@pytest.fixture(scope="module")
def dns(keys):
    server = TxtDns(
        txt=[
            (f"py-rsa._domainkey.{DOMAIN}", keys["rsa"].record()),
            (f"py-ed._domainkey.{DOMAIN}", keys["ed25519"].record()),
            (DOMAIN, "v=spf1 ip4:192.0.2.0/24 -all"),
            (f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject"),
        ],
    )
    yield server
    server.stop()


def verify(binary, dns, message, ip="192.0.2.10", mail_from=f"alice@{DOMAIN}"):
    out = subprocess.run(
        [str(binary), dns.address, ip, "mail.example.org", mail_from, "mx.petrel.test"],
        input=message, check=True, capture_output=True, timeout=120,
    ).stdout.decode()
    header, summary = out.rstrip("\n").rsplit("\n", 1)
    fields = dict(item.split("=", 1) for item in summary.split())
    return header, fields


@pytest.mark.parametrize("algorithm,selector", [("rsa", "py-rsa"), ("ed25519", "py-ed")])
def test_dkimpy_signature_passes_in_our_verifier(auth_verify, dns, keys, algorithm, selector):
    message = dkimpy_sign(EIGHT_BIT.replace(b"juergen@example.test", b"alice@example.test"),
                          keys[algorithm], selector)
    header, r = verify(auth_verify, dns, message)
    assert r["dkim"] == "pass", header
    assert r["spf"] == "pass", header
    assert r["dmarc"] == "pass", header
    assert r["policy"] == "none"
    assert header.startswith("Authentication-Results: mx.petrel.test;")
    # dkimpy signs with i=@example.test, which RFC 8601 reports as header.i.
    assert re.search(rf'dkim=pass header\.[di]="?@?{re.escape(DOMAIN)}"? header\.s={selector}',
                     header), header
    assert "spf=pass" in header and "dmarc=pass" in header


def test_tampered_dkimpy_message_fails_and_dmarc_rejects(auth_verify, dns, keys):
    message = dkimpy_sign(PLAIN, keys["rsa"], "py-rsa").replace(b"Hello.", b"Pay me.")
    # From a host outside the SPF record: nothing aligned passes, p=reject applies.
    header, r = verify(auth_verify, dns, message, ip="198.51.100.7")
    assert r["dkim"] in ("fail", "neutral"), header  # body hash mismatch
    assert r["spf"] == "fail", header
    assert r["dmarc"] == "fail", header
    assert r["policy"] == "reject", header
    assert r["temporary"] == "false"
