"""Issue 13 (hardening), item 8: spool segments, Maildir messages and the users file are
created 0600 (their directories 0700) whatever the umask. Before: 0644 under umask 022,
0666 under umask 0."""

import os
import smtplib
import stat
import subprocess

from conftest import BIN, Mta, config, maildir_files, wait_for


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_private_modes_under_umask_0(workdir):
    old = os.umask(0)  # inherited by the MTA and `passwd`
    try:
        users = workdir / "users"
        out = subprocess.run([str(BIN), "passwd", "alice@example.test", "--file", str(users)],
                             input="secret\n", capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        mta = Mta(workdir, config(workdir)).start()
    finally:
        os.umask(old)
    try:
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
            s.sendmail("a@remote.test", ["bob@example.test"], b"Subject: m\r\n\r\nhi\r\n")
        files = wait_for(lambda: maildir_files(workdir / "maildir", "bob"), what="delivery")
        spool = workdir / "spool"
        segments = [p for p in spool.iterdir() if p.is_file()]
        assert segments, "a spool segment"
        found = {str(p.relative_to(workdir)): mode(p) for p in
                 [users, *segments, *files]}
        found.update({str(d.relative_to(workdir)) + "/": mode(d) for d in
                      [spool, workdir / "maildir", workdir / "maildir" / "bob",
                       *[workdir / "maildir" / "bob" / sub for sub in ("tmp", "new", "cur")]]})
        wrong = {name: oct(m) for name, m in found.items()
                 if m != (0o700 if name.endswith("/") else 0o600)}
        assert not wrong, f"not private: {wrong}"
    finally:
        mta.kill()
