"""Issue 13, item 10: small conformance points checked against the real binary.

The session-level points (`RCPT TO:<postmaster>`, invalid UTF-8 in addresses, the EHLO
argument in `Received:`) are table-tested in the session tests (`conformance_table`,
`postmaster_delivery_and_a_sanitised_received_header`); here: `check-config` and the
generated certificate, seen by `openssl`."""

import smtplib
import ssl
import subprocess

import pytest

from conftest import BIN, Mta, config, maildir_files, wait_for


def check_config(path, *flags):
    return subprocess.run([str(BIN), "check-config", *flags, str(path)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("case, listeners, users, error", [
    ("valid", ["127.0.0.1:2525", "127.0.0.1:2587"], "present", None),
    ("users file missing", ["127.0.0.1:2525"], "missing", "smtpd.auth_users_file"),
    ("same address twice", ["127.0.0.1:2525", "127.0.0.1:2525"], None,
     "listeners[1].address"),
    ("wildcard covers the other", ["0.0.0.0:2525", "127.0.0.1:2525"], None,
     "listeners[1].address"),
    ("dual-stack wildcard covers IPv4", ["[::]:2525", "0.0.0.0:2525"], None,
     "listeners[1].address"),
])
def test_check_config_table(workdir, case, listeners, users, error):
    users_file = workdir / "users"
    text = "hostname: mx.petrel.test\nlisteners:\n" + "".join(
        f'  - address: "{address}"\n' for address in listeners)
    if users:
        text += f"smtpd:\n  auth_users_file: {users_file}\n"
    if users == "present":
        subprocess.run([str(BIN), "passwd", "--file", str(users_file), "user@example.test"],
                       input="secret\n", text=True, check=True, capture_output=True)
    path = workdir / "check.yaml"
    path.write_text(text)
    out = check_config(path)
    if error is None:
        assert out.returncode == 0, (case, out.stderr)
    else:
        assert out.returncode == 1 and error in out.stderr, (case, out.stderr)
    if users == "missing":
        # A config meant for another machine (the operator's) is checked as a document.
        assert check_config(path, "--document-only").returncode == 0


def test_generated_certificate_names_the_hostname(workdir):
    tls = workdir / "tls"
    text = config(workdir) + (
        f"tls:\n  cert_file: {tls / 'cert.pem'}\n  key_file: {tls / 'key.pem'}\n"
        "  generate_self_signed: true\n")
    mta = Mta(workdir, text).start()
    try:
        out = subprocess.run(
            ["openssl", "x509", "-in", str(tls / "cert.pem"), "-noout", "-subject", "-ext",
             "subjectAltName"],
            capture_output=True, text=True, check=True,
        ).stdout
        assert "CN=mx.petrel.test" in out.replace(" = ", "="), out
        assert "DNS:mx.petrel.test" in out, out
        # And the server presents it over STARTTLS.
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            context = ssl.create_default_context(cafile=str(tls / "cert.pem"))
            context.check_hostname = True
            smtp._host = "mx.petrel.test"  # the name TLS checks (we dialled 127.0.0.1)
            smtp.starttls(context=context)
            smtp.ehlo("client.test")
            smtp.sendmail("s@remote.test", ["user@example.test"], b"Subject: tls\r\n\r\nx\r\n")
        wait_for(lambda: maildir_files(workdir / "maildir", "user"), what="delivery")
    finally:
        mta.kill()
