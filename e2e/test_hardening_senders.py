"""Issue 13 (hardening), item 9: the null sender from an authenticated client is a sender
like any other. Before: a user restricted to their own address sent `MAIL FROM:<>` to
anyone (anonymous mail, and bounces nobody can trace back)."""

import smtplib

from conftest import maildir_files, wait_for
from test_security import PASSWORD, add_user, insecure_context, start


def submit(port, user):
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.starttls(context=insecure_context())
    s.ehlo("client.test")
    s.login(user, PASSWORD)
    return s


def test_restricted_user_may_not_use_the_null_sender(workdir):
    add_user(workdir, "bob@example.test", "@example.test")
    mta = start(workdir, ["smtp", "submission"])
    try:
        smtp, submission = mta.ports
        for user in ("alice@example.test", "bob@example.test"):
            with submit(submission, user) as s:
                code, text = s.mail("")
                assert (code, text[:5]) == (550, b"5.7.1"), (user, code, text)
                code, text = s.rcpt("victim@remote.test")
                assert code == 503, "no transaction was started"
                s.rset()
                code, _ = s.mail(user)
                assert code == 250, "the user's own address still works"
        # Bounces from the internet (no AUTH, port 25) keep the null sender.
        with smtplib.SMTP("127.0.0.1", smtp, timeout=30) as s:
            s.sendmail("", ["carol@example.test"], b"Subject: bounce\r\n\r\nnotice\r\n")
        wait_for(lambda: maildir_files(workdir / "maildir", "carol"), what="the bounce")
    finally:
        mta.kill()


def test_user_allowed_any_sender_may_use_the_null_sender(workdir):
    add_user(workdir, "autoreply@example.test", "*")
    mta = start(workdir, ["submission"])
    try:
        with submit(mta.ports[0], "autoreply@example.test") as s:
            s.sendmail("", ["dave@example.test"], b"Subject: away\r\n\r\nback soon\r\n")
        files = wait_for(lambda: maildir_files(workdir / "maildir", "dave"), what="delivery")
        assert files[0].read_bytes().startswith(b"Return-Path: <>\r\n")
    finally:
        mta.kill()
