"""Issue 13 (hardening), item 11: trusted clients are not limited like strangers. As
Postfix exempts $mynetworks, `max_connections_per_ip` and the per-IP rate limits spare
`smtpd.limit_exempt_networks` (default: `relay.client_networks`; loopback in the embedded
default). Before: the 51st connection from a local application got 421 4.7.0."""

import smtplib
import socket

from conftest import Mta, mta_header, wait_for

CONNECTIONS = 200


def limits_config(workdir, relay_networks, extra_smtpd=""):
    return mta_header(workdir) + f"""\
relay:
  client_networks: {relay_networks}
smtpd:
  max_connections_per_ip: 50
{extra_smtpd}
local_domains:
  - name: example.test
    delivery:
      maildir:
        root: {workdir / "maildir"}
"""


def open_many(mta, source, count):
    """Opens `count` connections from `source` and reads each greeting; returns the
    sockets (still open) and the first line each got."""
    socks, greetings = [], []
    for _ in range(count):
        s = socket.create_connection((mta.host, mta.port), timeout=30,
                                     source_address=(source, 0))
        socks.append(s)
        greetings.append(s.makefile("rb").readline())
    return socks, greetings


def close_all(socks):
    for s in socks:
        s.close()


def test_trusted_clients_get_200_connections_and_strangers_50(workdir):
    mta = Mta(workdir, limits_config(workdir, '["127.0.0.1/32"]')).start()
    try:
        trusted, greetings = open_many(mta, "127.0.0.1", CONNECTIONS)
        refused = [g for g in greetings if not g.startswith(b"220 ")]
        assert not refused, f"{len(refused)} of {CONNECTIONS} refused: {refused[0]!r}"
        stranger, greetings = open_many(mta, "127.0.0.2", 60)
        assert all(g.startswith(b"220 ") for g in greetings[:50]), greetings[:50]
        assert all(g.startswith(b"421 4.7.0") for g in greetings[50:]), greetings[50:]
        close_all(trusted + stranger)
    finally:
        mta.kill()


def test_rate_limits_spare_the_exempt_networks_only(workdir):
    """An explicit `limit_exempt_networks` exempts without relaying (as the embedded
    default does for loopback); everyone else keeps the per-IP message rate."""
    mta = Mta(workdir, limits_config(
        workdir, "[]",
        '  limit_exempt_networks: ["127.0.0.1/32"]\n'
        '  rate_limits: {messages_per_ip: 3/1h}\n')).start()
    try:
        with smtplib.SMTP(mta.host, mta.port, timeout=30,
                          source_address=("127.0.0.1", 0)) as s:
            for n in range(6):
                s.sendmail("app@example.test", ["bob@example.test"],
                           f"Subject: {n}\r\n\r\nhi\r\n".encode())
            code, text = s.mail("app@example.test")
            assert code == 250
            code, text = s.rcpt("someone@remote.test")
            assert (code, text[:5]) == (550, b"5.7.1"), "exempt from limits, not a relay"
        with smtplib.SMTP(mta.host, mta.port, timeout=30,
                          source_address=("127.0.0.2", 0)) as s:
            for n in range(3):
                s.sendmail("x@remote.test", ["bob@example.test"], b"Subject: s\r\n\r\nhi\r\n")
            code, text = s.mail("x@remote.test")
            assert (code, text[:5]) == (451, b"4.7.1"), (code, text)
        wait_for(lambda: len(list((workdir / "maildir" / "bob" / "new").glob("*"))) == 9,
                 what="nine deliveries")
    finally:
        mta.kill()
