"""Issue 13 (hardening), AUTH items over real sockets: failures lock out the source, not
the account (item 2)."""

import base64
import smtplib

from test_security import PASSWORD, insecure_context, start


def auth_plain(port, source, user, password):
    """One AUTH PLAIN over STARTTLS from `source` (a loopback address); the reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0)) as s:
        s.starttls(context=insecure_context())
        s.ehlo("client.test")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return s.docmd("AUTH", "PLAIN " + token)


def test_failures_from_many_addresses_do_not_lock_the_user_out(workdir):
    """Before: five failures against alice from any mix of addresses gave alice 454 4.7.0
    everywhere for 15 minutes."""
    mta = start(workdir, ["submission"])
    try:
        port = mta.ports[0]
        for n in range(2, 8):
            code, _ = auth_plain(port, f"127.0.0.{n}", "alice@example.test", "wrong")
            assert code == 535
        code, text = auth_plain(port, "127.0.0.20", "alice@example.test", PASSWORD)
        assert (code, text[:5]) == (235, b"2.7.0"), (code, text)
    finally:
        mta.kill()


def test_a_failing_source_is_locked_out_for_that_user(workdir):
    mta = start(workdir, ["submission"])
    try:
        port = mta.ports[0]
        for _ in range(5):
            code, _ = auth_plain(port, "127.0.0.30", "alice@example.test", "wrong")
            assert code == 535
        code, text = auth_plain(port, "127.0.0.30", "alice@example.test", PASSWORD)
        assert (code, text[:5]) == (454, b"4.7.0"), "this source may not guess on"
        code, text = auth_plain(port, "127.0.0.31", "alice@example.test", PASSWORD)
        assert (code, text[:5]) == (235, b"2.7.0"), "alice from elsewhere still logs in"
    finally:
        mta.kill()
