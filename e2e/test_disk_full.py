"""Disk full: a real, tiny tmpfs spool. The client gets 452 4.3.1, nothing accepted is
lost, and the MTA accepts again by itself once space returns."""

import os
import smtplib
import subprocess

import pytest

from conftest import Mta, config, maildir_files, wait_for
from test_inbound import message
from test_observe import http_get


@pytest.fixture
def tiny_spool(workdir):
    mount = workdir / "tiny"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"SKIPPED: cannot mount a tmpfs (needs root): {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def send(mta, token, size):
    with smtplib.SMTP(mta.host, mta.port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        try:
            smtp.sendmail("s@remote.test", ["held@stuck.test"], message(token, size))
            return 250, b""
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error


def test_full_spool_gives_452_and_recovers(workdir, tiny_spool):
    # Messages for stuck.test cannot be delivered (its Maildir root is not a directory),
    # so they stay in the spool and fill it.
    stuck = "  - name: stuck.test\n    delivery:\n      maildir:\n        root: /dev/null/nowhere\n"
    filler = tiny_spool / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024))
    with_http = config(workdir, extra_domains=stuck, spool=tiny_spool / "spool").replace(
        "admin:\n", "http:\n  address: 127.0.0.1:0\nadmin:\n")
    mta = Mta(workdir, with_http).start()
    accepted = []
    try:
        code, text = 250, b""
        for i in range(200):
            code, text = send(mta, f"fill-{i}", 100_000)
            if code != 250:
                break
            accepted.append(f"fill-{i}")
        assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
        assert accepted, "some mail fit before the disk filled"
        status, body = http_get(mta, "/readyz")
        assert status == 503 and "spool not writable" in body, (status, body)
        # Still full: still a temporary refusal, never a permanent one.
        assert send(mta, "still-full", 100_000)[0] == 452

        os.unlink(filler)  # space returns
        assert send(mta, "after-space", 100_000)[0] == 250
        accepted.append("after-space")
        assert http_get(mta, "/readyz")[0] == 200, "ready again once writes succeed"
    finally:
        mta.kill()

    # Nothing accepted was lost: deliver everything once stuck.test has a real Maildir.
    fixed = f"  - name: stuck.test\n    delivery:\n      maildir:\n        root: {workdir / 'stuck'}\n"
    mta = Mta(workdir, config(workdir, extra_domains=fixed, spool=tiny_spool / "spool")).start()
    try:
        files = wait_for(
            lambda: (f := maildir_files(workdir / "stuck", "held")) and len(f) >= len(accepted) and f,
            timeout=120, what="every accepted message delivered",
        )
        subjects = sorted(
            f.read_bytes().split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for f in files
        )
        assert subjects == sorted(accepted)
    finally:
        mta.kill()
