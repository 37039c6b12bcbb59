"""Issue 17: the queue's memory does not grow with its depth, and a restart with a deep
queue listens at once, scheduling the queued messages in the background.

One run, on loopback, with local (Maildir) delivery: 2,000 messages are accepted and held
(queue.hold_all), the MTA is SIGKILLed, and restarted without hold_all. Then:

* the restarted MTA takes a new message at once (it is delivered while the recovered ones
  are still held);
* `queue list` answers for the whole queue (queue operations wait for recovery): 2,000
  held messages, each with its envelope (read from the spool, not from memory);
* `queue release --all` delivers every one of them exactly once (a unique token each);
* the queue ends empty, and the log says recovery completed.

The figures for a million messages (RSS per queued message, restart time) come from the
benchmark, `python3 e2e/bench/run.py --only queue --queue-sizes 10000,100000,1000000`.
"""

import json
import re
import smtplib
import subprocess
import threading
import urllib.request
from pathlib import Path

from conftest import BIN, Mta, config, maildir_files, wait_for

MESSAGES = 2000
SENDERS = 4


def admin_address(mta):
    line = next(l for l in mta.stdout_lines if "admin endpoint" in l)
    return line.rsplit(" on ", 1)[1]


def queue_cli(mta, *args):
    return subprocess.run([str(BIN), "queue", "--admin", admin_address(mta),
                           "--config", str(mta.config_path), *args],
                          capture_output=True, text=True, timeout=120)


def send_many(mta, tokens):
    """Sends one message per token over a few connections (several messages each)."""
    errors = []

    def sender(part):
        try:
            with smtplib.SMTP(mta.host, mta.port, timeout=60) as s:
                s.ehlo("client.test")
                for token in part:
                    body = (f"From: a@sender.test\r\nTo: user@example.test\r\n"
                            f"Subject: {token}\r\n\r\ntoken {token}\r\n")
                    s.sendmail("a@sender.test", ["user@example.test"], body.encode())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=sender, args=(tokens[i::SENDERS],))
               for i in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], errors


def queue_gauges(mta):
    """petrel_mta_queue_messages by state, from the MTA's /metrics."""
    line = next(l for l in mta.stdout_lines if "/metrics, /healthz" in l)
    url = line.rsplit(" on ", 1)[1] + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): int(float(m.group(2))) for m in re.finditer(
        r'^petrel_mta_queue_messages\{state="(\w+)"\} (\S+)$', text, re.M)}


def delivered_tokens(workdir):
    tokens = []
    for path in maildir_files(workdir / "maildir", "user"):
        for line in Path(path).read_bytes().decode(errors="replace").splitlines():
            if line.startswith("token "):
                tokens.append(line.split(" ", 1)[1])
    return tokens


def test_a_deep_queue_is_recovered_in_the_background_and_delivered_once(workdir):
    held = config(workdir).replace("queue:\n", "queue:\n  hold_all: true\n")
    assert "hold_all: true" in held
    mta = Mta(workdir, held).start()
    tokens = [f"t{i:05d}" for i in range(MESSAGES)]
    try:
        send_many(mta, tokens)
    finally:
        mta.kill()  # SIGKILL: recovery works from the segments alone

    with_metrics = config(workdir) + "http:\n  address: 127.0.0.1:0\n"
    mta = Mta(workdir, with_metrics).start()
    try:
        # Taken and delivered at once, whatever recovery is doing.
        send_many(mta, ["fresh"])
        wait_for(lambda: "fresh" in delivered_tokens(workdir), timeout=60,
                 what="the message sent after the restart delivered")

        listing = json.loads(queue_cli(mta, "--json", "list").stdout)["messages"]
        assert len(listing) == MESSAGES, len(listing)
        assert all(m["state"] == "held" for m in listing)
        assert all(m["recipients"][0]["address"] == "user@example.test" for m in listing)
        assert len({m["id"] for m in listing}) == MESSAGES
        # The listing waited for recovery: every message is counted as held, none as
        # still to be recovered (the operator's queueDepth sums these states).
        gauges = queue_gauges(mta)
        assert gauges.get("held") == MESSAGES and gauges.get("recovering") == 0, gauges

        out = queue_cli(mta, "release", "--all")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: len(delivered_tokens(workdir)) >= MESSAGES + 1, timeout=300,
                 interval=0.2, what="every released message delivered")
        got = delivered_tokens(workdir)
        assert sorted(got) == sorted(tokens + ["fresh"]), "each exactly once"
        wait_for(lambda: json.loads(queue_cli(mta, "--json", "list").stdout)["messages"] == [],
                 timeout=60, what="the queue empty")
        assert "recovered: every queued message is scheduled" in mta.log()
    finally:
        mta.stop()
