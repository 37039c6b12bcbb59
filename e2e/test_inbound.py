"""Inbound path over real sockets with clients nobody here wrote: smtplib and swaks."""

import shutil
import smtplib
import socket
import subprocess

import pytest

from conftest import Mta, config, maildir_files, strip_received, wait_for


def message(token: str, size: int = 2048) -> bytes:
    head = (
        f"From: sender@remote.test\r\nTo: user@example.test\r\n"
        f"Subject: {token}\r\nMessage-ID: <{token}@remote.test>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789.\r\n"
    body = (line * (size // len(line) + 1))[:size]
    body = body[: body.rfind(b"\r\n") + 2]
    return head + b".leading dot survives\r\n" + body


def test_smtplib_delivers_into_maildir_byte_for_byte(mta, workdir):
    sent = message("smtplib-1")
    with smtplib.SMTP(mta.host, mta.port, timeout=30) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        assert client.has_extn("pipelining") and client.has_extn("chunking")
        assert client.has_extn("smtputf8") and client.has_extn("dsn")
        refused = client.sendmail("sender@remote.test", ["Alice@Example.TEST"], sent)
        assert refused == {}
    files = wait_for(lambda: maildir_files(workdir / "maildir", "alice"), what="maildir file")
    assert len(files) == 1
    stored = files[0].read_bytes()
    assert strip_received(stored) == sent
    assert b"by mx.petrel.test (Petrel) with ESMTP id" in stored


def test_relaying_is_refused(mta):
    with smtplib.SMTP(mta.host, mta.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.test")
        code, text = client.rcpt("victim@elsewhere.test")
        assert (code, text[:5]) == (550, b"5.7.1")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_delivers(mta, workdir):
    out = subprocess.run(
        ["swaks", "--server", f"{mta.host}:{mta.port}", "--to", "user@example.test",
         "--from", "me@remote.test", "--header", "Subject: via swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    files = wait_for(lambda: maildir_files(workdir / "maildir", "user"), what="maildir file")
    assert b"Subject: via swaks" in files[0].read_bytes()


def test_swaks_bdat_and_pipelining(mta, workdir):
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed")
    out = subprocess.run(
        ["swaks", "--server", f"{mta.host}:{mta.port}", "--to", "chunky@example.test",
         "--pipeline", "--header", "Subject: pipelined"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for(lambda: maildir_files(workdir / "maildir", "chunky"), what="maildir file")


def test_connections_per_ip_are_limited_and_others_still_served(workdir):
    server = Mta(workdir, config(workdir, max_connections_per_ip=3)).start()
    try:
        held = []
        for _ in range(3):
            s = socket.create_connection((server.host, server.port), timeout=30)
            assert s.recv(512).startswith(b"220 ")
            held.append(s)
        extra = socket.create_connection((server.host, server.port), timeout=30)
        assert extra.recv(512).startswith(b"421 4.7.0")
        extra.close()
        held.pop().close()
        # A slot is free again once the server has seen the close.
        def admitted():
            s = socket.create_connection((server.host, server.port), timeout=30)
            ok = s.recv(512).startswith(b"220 ")
            s.close()
            return ok
        wait_for(admitted, what="a free connection slot")
        for s in held:
            s.close()
    finally:
        server.kill()


def test_clean_shutdown_on_sigterm(mta):
    assert mta.stop() == 0
    assert any("stopped" in line for line in mta.stdout_lines)


def test_check_config_names_bad_keys(workdir):
    from conftest import BIN
    bad = workdir / "bad.yaml"
    bad.write_text("hostname: mx.test\nsmtpd:\n  max_recipients: 0\n  bogus_key: 1\n")
    out = subprocess.run([str(BIN), "check-config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "bogus_key" in out.stderr
    bad.write_text("hostname: mx.test\nsmtpd:\n  max_recipients: 0\n")
    out = subprocess.run([str(BIN), "check-config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "smtpd.max_recipients: must be at least 1" in out.stderr
    good = subprocess.run(
        [str(BIN), "check-config", str(workdir.parent.parent / "x")],
        capture_output=True, text=True,
    )
    assert good.returncode == 1 and "cannot read" in good.stderr
