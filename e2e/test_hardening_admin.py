"""Issue 13 (hardening), item 4: the admin endpoint behind `petrel-mta queue` needs the
token the MTA writes (0600) into its token file, and anything that is not the admin
protocol closes the connection. Before: any local user (or an HTTP POST from a browser
page) could list senders and recipients, delete, bounce or release the queue."""

import json
import smtplib
import socket
import stat
import subprocess

from conftest import BIN, Mta, mta_header, wait_for


def held_config(workdir):
    """Every accepted message stays in the queue, held, so there is something to list."""
    return mta_header(workdir) + f"""\
queue:
  hold_all: true
local_domains:
  - name: example.test
    delivery:
      maildir:
        root: {workdir / "maildir"}
"""


def admin_address(mta):
    line = wait_for(lambda: next((l for l in mta.stdout_lines if "admin endpoint" in l), None),
                    what="the admin endpoint line")
    host, port = line.rsplit(" on ", 1)[1].rsplit(":", 1)
    return host, int(port)


def cli(mta, *args):
    """`petrel-mta queue` as the MTA's user, finding the token through the config."""
    host, port = admin_address(mta)
    return subprocess.run([str(BIN), "queue", "--admin", f"{host}:{port}",
                           "--config", str(mta.config_path), *args],
                          capture_output=True, text=True, timeout=60)


def queued_ids(mta):
    out = cli(mta, "--json", "list")
    assert out.returncode == 0, out.stderr
    return [m["id"] for m in json.loads(out.stdout)["messages"]]


def cli_id(queue_id):
    """The CLI's spelling of a queue id (the JSON carries the number)."""
    return f"{queue_id:016X}"


def start_with_one_held_message(workdir):
    mta = Mta(workdir, held_config(workdir)).start()
    with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
        s.sendmail("secret-sender@remote.test", ["bob@example.test"],
                   b"Subject: private\r\n\r\nhi\r\n")
    ids = wait_for(lambda: queued_ids(mta), what="the held message in the queue")
    return mta, ids[0]


def exchange(mta, data: bytes) -> bytes:
    """Sends `data` and reads until the endpoint closes the connection (or 10 s pass,
    which the assertions then report: the endpoint kept the connection open)."""
    with socket.create_connection(admin_address(mta), timeout=10) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass  # closed with our bytes unread: that is closing at once
        except socket.timeout:
            got += b"<still open>"
        return got


def test_token_file_is_private_and_the_cli_uses_it(workdir):
    mta, queue_id = start_with_one_held_message(workdir)
    try:
        token = workdir / "admin.token"  # beside the spool directory
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert len(token.read_text().strip()) == 64
        assert f"admin token in {token}" in "\n".join(mta.stdout_lines)
        out = cli(mta, "show", cli_id(queue_id))
        assert out.returncode == 0, out.stderr
        assert "<bob@example.test>" in out.stdout
        out = cli(mta, "delete", cli_id(queue_id))
        assert out.returncode == 0 and "1 message(s) affected" in out.stdout, out
        wait_for(lambda: queued_ids(mta) == [], what="an empty queue")
    finally:
        mta.kill()


def test_without_the_token_nothing_is_listed_or_deleted(workdir):
    """A local user who cannot read the token file: no token, or a guessed one."""
    mta, queue_id = start_with_one_held_message(workdir)
    try:
        for line in [{"op": "list"},
                     {"op": "list", "token": ""},
                     {"op": "delete", "id": queue_id, "token": "0" * 64},
                     {"op": "release", "id": None, "token": 64}]:
            got = exchange(mta, json.dumps(line).encode() + b"\n")
            reply = json.loads(got.split(b"\n")[0])
            assert reply == {"result": "error",
                             "message": "not authorised: wrong or missing admin token"}, got
            assert got.count(b"\n") == 1, f"one error, then the connection closes: {got!r}"
        assert b"secret-sender" not in got
        wrong = workdir / "guessed.token"
        wrong.write_text("f" * 64 + "\n")
        for op in (["list"], ["delete", cli_id(queue_id)]):
            out = cli(mta, "--token-file", str(wrong), *op)
            assert out.returncode != 0, out.stdout
            assert "not authorised" in out.stderr, out.stderr
            assert "secret-sender" not in out.stdout
        out = subprocess.run([str(BIN), "queue", "--admin", "%s:%d" % admin_address(mta),
                              "--token-file", str(workdir / "missing.token"), "list"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "cannot read the admin token" in out.stderr, out
        assert queued_ids(mta) == [queue_id], "nothing was deleted"
    finally:
        mta.kill()


def test_http_requests_are_closed_unanswered_and_never_run(workdir):
    """A browser page or an SSRF can make a POST whose body is a JSON line; even one with
    the right token (which it cannot know) must not run: the request line ends it."""
    mta, queue_id = start_with_one_held_message(workdir)
    try:
        path = workdir / "admin.token"
        token = path.read_text().strip() if path.exists() else "none before item 4"
        body = json.dumps({"op": "delete", "id": queue_id, "token": token}).encode() + b"\n"
        for method in (b"POST", b"PUT", b"GET", b"OPTIONS"):
            request = (method + b" / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
                       + body)
            assert exchange(mta, request) == b"", method
        assert exchange(mta, b"\r\n" + body) == b"", "a blank first line is not the protocol"
        assert queued_ids(mta) == [queue_id], "nothing was deleted"
        assert "not the admin protocol" in mta.log()
    finally:
        mta.kill()


def test_a_long_queue_is_listed_page_by_page(workdir):
    """Issue 17: `list` is streamed in pages of 1000 (each written before the next is
    asked of the scheduler), so a long queue is never one reply in the MTA's memory; the
    CLI prints the same table and the same JSON as for a short one."""
    count = 2100
    mta = Mta(workdir, held_config(workdir)).start()
    try:
        with smtplib.SMTP(mta.host, mta.port, timeout=60) as s:
            for n in range(count):
                s.sendmail("sender@remote.test", ["bob@example.test"],
                           f"Subject: {n}\r\n\r\nhi\r\n".encode())
        token_line = next(l for l in mta.stdout_lines if "admin token in" in l)
        token = open(token_line.split("admin token in ", 1)[1].split(" (", 1)[0]).read().strip()
        request = json.dumps({"op": "list", "token": token}).encode() + b"\n"
        with socket.create_connection(admin_address(mta), timeout=30) as sock:
            sock.sendall(request)
            reader = sock.makefile("rb")
            pages = []
            while True:
                page = json.loads(reader.readline())
                assert page["result"] == "list_page", page
                pages.append(page)
                if not page["more"]:
                    break
        ids = [m["id"] for p in pages for m in p["messages"]]
        assert [len(p["messages"]) for p in pages] == [1000, 1000, 100]
        assert ids == sorted(set(ids)) and len(ids) == count, "each message once, by id"

        text = cli(mta, "list")
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].startswith("QUEUE ID") and lines[-1] == f"{count} message(s)"
        assert sum(1 for l in lines if " held " in l) == count
        assert queued_ids(mta) == ids
    finally:
        mta.kill()
