"""Local delivery over LMTP to Dovecot (Debian's dovecot-lmtpd) with a throwaway config:
per-recipient replies over TCP and over a unix socket, and a bounce for the unknown user."""

import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import mta_header, Mta, maildir_files, wait_for
from outbound import free_port

pytestmark = pytest.mark.skipif(shutil.which("dovecot") is None,
                                reason="dovecot (dovecot-lmtpd) is not installed")


@pytest.fixture
def dovecot():
    # Dovecot's unprivileged processes must reach these files: not under pytest's 0700 tmp.
    root = Path(tempfile.mkdtemp(prefix="petrel-dovecot-"))
    root.chmod(0o755)
    for d in ("run", "state", "mail"):
        (root / d).mkdir(parents=True)
    nobody = pwd.getpwnam("nobody")
    os.chown(root / "mail", nobody.pw_uid, nobody.pw_gid)
    (root / "users").write_text(
        f"alice::{nobody.pw_uid}:{nobody.pw_gid}::{root / 'mail' / 'alice'}::\n"
        f"bob::{nobody.pw_uid}:{nobody.pw_gid}::{root / 'mail' / 'bob'}::\n")
    port = free_port()
    (root / "dovecot.conf").write_text(f"""\
protocols = lmtp
listen = 127.0.0.1
base_dir = {root / 'run'}
state_dir = {root / 'state'}
log_path = {root / 'dovecot.log'}
ssl = no
mail_location = maildir:~/Maildir
first_valid_uid = 1
userdb {{
  driver = passwd-file
  args = username_format=%n {root / 'users'}
}}
passdb {{
  driver = passwd-file
  args = username_format=%n {root / 'users'}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
""")
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(root / "dovecot.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def listening():
        try:
            with smtplib.LMTP("127.0.0.1", port, timeout=5):
                return True
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"dovecot exited: {proc.stderr.read()}")
            return False

    wait_for(listening, what="dovecot LMTP")
    yield root, port
    proc.kill()
    proc.wait(10)
    shutil.rmtree(root, ignore_errors=True)


def lmtp_config(workdir, tcp, socket_path):
    return f"""\
{mta_header(workdir)}queue:
  retry_interval: 1s
  max_retry_interval: 2s
local_domains:
  - name: example.test
    delivery:
      lmtp:
        address: 127.0.0.1:{tcp}
  - name: sock.test
    delivery:
      lmtp:
        address: {socket_path}
  - name: sender.test
    delivery:
      maildir:
        root: {workdir / "maildir"}
"""


def test_lmtp_per_recipient_results_and_bounce(workdir, dovecot):
    root, port = dovecot
    mta = Mta(workdir, lmtp_config(workdir, port, root / "run" / "lmtp")).start()
    try:
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
            s.sendmail("carol@sender.test", ["alice@example.test", "ghost@example.test"],
                       b"Subject: via lmtp\r\n\r\nhello dovecot\r\n")
            s.sendmail("carol@sender.test", ["bob@sock.test"],
                       b"Subject: via unix socket\r\n\r\nhello again\r\n")
        alice = wait_for(lambda: list((root / "mail" / "alice" / "Maildir" / "new").glob("*"))
                         if (root / "mail" / "alice" / "Maildir" / "new").exists() else None,
                         what="alice's copy in Dovecot")
        assert b"Subject: via lmtp" in alice[0].read_bytes()
        bob = wait_for(lambda: list((root / "mail" / "bob" / "Maildir" / "new").glob("*"))
                       if (root / "mail" / "bob" / "Maildir" / "new").exists() else None,
                       what="bob's copy over the unix socket")
        assert b"Subject: via unix socket" in bob[0].read_bytes()
        bounce = wait_for(lambda: maildir_files(workdir / "maildir", "carol"),
                          what="bounce for ghost")
        text = bounce[0].read_bytes().decode()
        assert "Final-Recipient: rfc822; ghost@example.test" in text
        assert "Action: failed" in text and "Status: 5.1.1" in text
        assert "alice@example.test" not in text.split("message/delivery-status")[1].split(
            "message/rfc822")[0], "only the failed recipient is reported"
    finally:
        mta.kill()
