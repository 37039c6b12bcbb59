"""Issue 13, item 5: a spool volume smaller than `spool.segment_size` (64 MiB by default)
is filled until the MTA answers 452, its mail is then delivered, and the MTA accepts mail
again without a restart. Needs root for the tmpfs; says SKIPPED without it."""

import smtplib
import subprocess

import pytest

from conftest import Mta, config, maildir_files, wait_for
from test_inbound import message

VOLUME = 32 * 1024 * 1024
SIZE = 256 * 1024


@pytest.fixture
def small_volume(workdir):
    mount = workdir / "volume"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={VOLUME}", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"SKIPPED: cannot mount a tmpfs (needs root): {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def send(mta, token):
    with smtplib.SMTP(mta.host, mta.port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        try:
            smtp.sendmail("s@remote.test", ["held@stuck.test"], message(token, SIZE))
            return 250, b""
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error


def fill(mta, prefix, limit):
    """Sends until a refusal or `limit` messages; returns the accepted tokens and the
    refusal (None when every message was accepted)."""
    accepted = []
    for i in range(limit):
        token = f"{prefix}-{i}"
        code, text = send(mta, token)
        if code != 250:
            return accepted, (code, text)
        accepted.append(token)
    return accepted, None


def test_small_volume_accepts_again_after_its_mail_is_delivered(workdir, small_volume):
    # stuck.test's Maildir root is a file at first, so its mail stays queued (deferred).
    root = workdir / "stuck"
    root.write_text("not a directory yet")
    stuck = f"  - name: stuck.test\n    delivery:\n      maildir:\n        root: {root}\n"
    # The default segment_size (64 MiB): twice the volume.
    text = config(workdir, extra_domains=stuck, spool=small_volume / "spool")
    text = text.replace("  segment_size: 1048576\n", "")
    assert "segment_size" not in text
    mta = Mta(workdir, text).start()
    try:
        accepted, refusal = fill(mta, "fill", 2 * VOLUME // SIZE)
        assert refusal is not None, "a 32 MiB volume cannot hold 64 MiB"
        assert (refusal[0], refusal[1][:5]) == (452, b"4.3.1"), refusal
        assert len(accepted) * SIZE > VOLUME // 2, f"only {len(accepted)} messages fit"
        print(f"filled: {len(accepted) * SIZE} bytes accepted before {refusal[0]}")

        # Drain: the Maildir root becomes a directory and the retries deliver everything.
        root.unlink()
        wait_for(lambda: len(maildir_files(root, "held")) >= len(accepted),
                 timeout=120, what="the queued mail delivered")

        # Accepted again, without a restart. Each new message is delivered too, so the
        # volume never has to hold more than a fraction of what is sent here.
        wait_for(lambda: send(mta, "first-after-drain")[0] == 250, timeout=60,
                 what="a message accepted after the drain")
        again, refusal = fill(mta, "again", 2 * VOLUME // SIZE)
        print(f"after drain: {(len(again) + 1) * SIZE} bytes accepted, refusal {refusal}")
        assert refusal is None, (len(again), refusal)
        wait_for(lambda: len(maildir_files(root, "held")) >= len(accepted) + len(again) + 1,
                 timeout=120, what="the later mail delivered")
    finally:
        mta.kill()
