"""Issue 13 (hardening), item 7: client-supplied text cannot forge log lines. Before: a
user name with CR LF and ANSI escapes went raw into the text log (a forged
`INFO … authenticated user=root` line), and the log was coloured even into a file."""

import base64
import smtplib

from test_security import insecure_context, start

FORGED = "FORGED-LINE INFO petrel: authenticated user=root"


def test_user_name_with_newline_and_ansi_is_escaped(workdir):
    mta = start(workdir, ["submission"])
    try:
        with smtplib.SMTP("127.0.0.1", mta.ports[0], timeout=60) as s:
            s.starttls(context=insecure_context())
            s.ehlo("client.test")
            user = f"mallory\r\n{FORGED}\x1b[2J\x1b[31m"
            token = base64.b64encode(f"\0{user}\0wrong".encode()).decode()
            code, _ = s.docmd("AUTH", "PLAIN " + token)
            assert code == 535
        log = mta.log()  # the failure is logged before the reply is sent
        assert "authentication failed" in log
        assert "\x1b" not in log, "no escape sequence reaches a non-terminal log"
        forged = [line for line in log.splitlines() if line.startswith("FORGED-LINE")]
        assert not forged, forged
        assert "mallory\\r\\nFORGED-LINE" in log, "the name is logged, escaped"
    finally:
        mta.kill()
