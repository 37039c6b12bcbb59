"""The petrel-mta container image under podman, run the way the operator's StatefulSet runs
it: read-only root filesystem, uid/gid 65532, no capabilities, no privilege escalation, a
tmpfs /tmp, the queue on a volume and the config mounted read-only at the path the image's
default arguments name.

Mail for remote.test is relayed to an aiosmtpd sink on the host that first defers it, so
the queue is full when the container gets SIGTERM; a new container on the same volume must
then deliver every accepted message exactly once.

The image comes from the OCI archive scripts/build-images.sh writes
($PETREL_IMAGES_DIR, default target/images); without podman or the archive the tests skip.
"""

import json
import os
import re
import shutil
import smtplib
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, wait_for
from outbound import Sink, free_port

IMAGES_DIR = Path(os.environ.get("PETREL_IMAGES_DIR", ROOT / "target" / "images"))
ARCHIVE = IMAGES_DIR / "petrel-mta.tar"
RUN_AS = 65532
MESSAGES = 50
LOCAL_EVERY = 5  # every 5th message is for the local Maildir domain, the others relayed

# The StatefulSet's securityContext, in podman's words. `--read-only-tmpfs=false`: podman
# would otherwise add writable tmpfs mounts on /run and /var/tmp that a pod does not get.
RESTRICTED = [
    "--runtime", "runc", "--read-only", "--read-only-tmpfs=false",
    "--user", f"{RUN_AS}:{RUN_AS}", "--cap-drop", "ALL",
    "--security-opt", "no-new-privileges",
    "--tmpfs", "/tmp:rw,nosuid,nodev,mode=1777,size=64m",
]


def podman(*args, check=True, timeout=120, **kwargs):
    out = subprocess.run(["podman", *args], capture_output=True, text=True,
                         timeout=timeout, **kwargs)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({out.returncode}):\n"
                             f"{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """Loads the archive; gives the image's name."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/build-images.sh installs it)")
    if not ARCHIVE.is_file():
        pytest.skip(f"no image archive at {ARCHIVE}: run scripts/build-images.sh first")
    before = os.environ.get("CONTAINERS_CONF")
    if not before:
        # runc, and no default ulimits (raising RLIMIT_NPROC is not permitted here).
        conf = IMAGES_DIR / "containers.conf"
        if not conf.is_file():
            conf = tmp_path_factory.mktemp("podman") / "containers.conf"
            conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
        os.environ["CONTAINERS_CONF"] = str(conf)
    try:
        out = podman("load", "-i", str(ARCHIVE), timeout=600)
        names = re.findall(r"Loaded image(?:\(s\))?: (\S+)", out.stdout + out.stderr)
        assert names, out.stdout + out.stderr
        yield names[0].split(",")[0]
    finally:
        if not before:
            os.environ.pop("CONTAINERS_CONF", None)


class Containers:
    """Names of the containers a test started; all are removed at the end, pass or fail."""

    def __init__(self):
        self.names = []

    def run(self, image, *args):
        name = f"petrel-e2e-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        podman("run", "-d", "--name", name, *args, image)
        return name

    def remove_all(self):
        for name in self.names:
            podman("rm", "-f", "-t", "0", name, check=False)


@pytest.fixture
def containers():
    c = Containers()
    yield c
    c.remove_all()


def logs(name):
    out = podman("logs", name, check=False)
    return out.stdout + out.stderr


def state(name):
    return json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)


def smtp_address(name):
    """The address the MTA printed (it binds port 0), once it has; fails at once if the
    container died."""
    m = re.search(r"listening for SMTP on (\S+):(\d+)\s*$", logs(name), re.M)
    if m:
        return m.group(1), int(m.group(2))
    if not state(name)["Running"]:
        raise AssertionError(f"container {name} exited: {state(name)}\n{logs(name)}")
    return None


def proc_status(name):
    pid = state(name)["Pid"]
    fields = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    root = next(line for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                if line.split()[4] == "/")
    return fields, root


def stop(name):
    """SIGTERM (the image's STOPSIGNAL; SIGKILL only after 60 s) and the exit state."""
    podman("stop", "-t", "60", name, timeout=120)
    return state(name)


def message(token):
    return (f"From: sender@client.test\r\nTo: someone\r\nSubject: {token}\r\n"
            f"Message-ID: <{token}@client.test>\r\n\r\n"
            f"Body of {token}.\r\n.leading dot\r\n").encode()


def token_of(data: bytes) -> str:
    return data.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0].decode()


def test_build_context_ignore_files_agree():
    """podman reads .containerignore, docker .dockerignore: the context must be the same."""
    assert (ROOT / ".dockerignore").read_text() == (ROOT / ".containerignore").read_text()


def test_image_metadata_and_contents(image):
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["User"] == f"{RUN_AS}:{RUN_AS}"
    assert config["Entrypoint"] == ["/usr/local/bin/petrel-mta"]
    assert config["Cmd"] == ["serve", "--config", "/etc/petrel/config/mta.yaml"]
    assert set(config["ExposedPorts"]) == {"10025/tcp", "10587/tcp", "10465/tcp", "8080/tcp"}
    labels = config["Labels"]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    version = re.search(r'^version = "(.+)"', (ROOT / "Cargo.toml").read_text(), re.M)[1]
    assert labels["org.opencontainers.image.version"] == version
    containerfile = (ROOT / "images" / "Containerfile").read_text()
    assert re.search(r"^ARG VERSION=(\S+)$", containerfile, re.M)[1] == version, \
        "images/Containerfile's default VERSION differs from Cargo.toml's"
    assert image.endswith(f"/petrel-mta:{version}"), image

    root = Path(podman("image", "mount", image).stdout.strip())
    try:
        binary = root / "usr/local/bin/petrel-mta"
        st = binary.stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o555), "binary writable by its user"
        for shell in ("bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"):
            assert not (root / shell).exists(), f"{shell} in the image"
        assert f"nonroot:x:{RUN_AS}:{RUN_AS}:" in (root / "etc/passwd").read_text()
        assert f"nonroot:x:{RUN_AS}:" in (root / "etc/group").read_text()
        assert (root / "tmp").is_dir()
    finally:
        podman("image", "unmount", image, check=False)


def probe_write(containers, image, path, *extra):
    """Runs the image's own binary to write `path` (`petrel-mta passwd --file`)."""
    name = f"petrel-e2e-{uuid.uuid4().hex[:10]}"
    containers.names.append(name)
    return subprocess.run(
        ["podman", "run", "-i", "--name", name, *extra,
         "--entrypoint", "/usr/local/bin/petrel-mta", image,
         "passwd", "probe@example.test", "--file", path],
        input="s3cret\n", capture_output=True, text=True, timeout=120)


def test_runs_as_nonroot_with_a_read_only_root(image, containers, tmp_path):
    # The image's own USER, without --user: a file it writes on a world-writable volume
    # belongs to 65532.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    out = probe_write(containers, image, "/probe/users", "--runtime", "runc",
                      "-v", f"{shared}:/probe")
    assert out.returncode == 0, out.stdout + out.stderr
    st = (shared / "users").stat()
    assert (st.st_uid, st.st_gid) == (RUN_AS, RUN_AS)

    # Under the StatefulSet's settings the root filesystem refuses writes as such (EROFS,
    # not a permission error): at / and in 65532's own home directory alike.
    for path in ("/users", "/home/nonroot/users"):
        out = probe_write(containers, image, path, *RESTRICTED)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Read-only file system" in out.stderr, out.stderr
    # while the tmpfs /tmp is writable.
    out = probe_write(containers, image, "/tmp/users", *RESTRICTED)
    assert out.returncode == 0, out.stdout + out.stderr


def mta_config(sink_port):
    return f"""\
version: 1
hostname: mx.petrel.test
listeners:
  - address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
http:
  address: 127.0.0.1:0
smtpd:
  rate_limits: {{messages_per_ip: "off", recipients_per_ip: "off"}}
spool:
  path: /var/lib/petrel/spool
relay:
  client_networks: ["127.0.0.0/8"]
routes:
  - domain: remote.test
    smarthost: "127.0.0.1:{sink_port}"
    tls: none
smtp_client:
  mta_sts: false
  connect_timeout: 5s
queue:
  retry_interval: 1s
  max_retry_interval: 2s
local_domains:
  - name: example.test
    delivery:
      maildir:
        root: /var/lib/petrel/maildir
"""


def test_sigterm_with_a_full_queue_then_restart_delivers_each_message_once(
        image, containers, tmp_path):
    sink = Sink("127.0.0.1", free_port(), rcpt_reply="451 4.3.2 not yet, try again")
    try:
        run_and_restart(image, containers, tmp_path, sink)
    finally:
        sink.stop()


def run_and_restart(image, containers, tmp_path, sink):
    data = tmp_path / "data"  # the queue volume, as a PVC with fsGroup 65532 would be
    data.mkdir()
    os.chown(data, RUN_AS, RUN_AS)
    data.chmod(0o750)
    config_dir = tmp_path / "config"  # the ConfigMap
    config_dir.mkdir()
    (config_dir / "mta.yaml").write_text(mta_config(sink.controller.port))
    config_dir.chmod(0o755)
    args = [*RESTRICTED, "--network", "host",
            "-v", f"{data}:/var/lib/petrel", "-v", f"{config_dir}:/etc/petrel/config:ro"]

    first = containers.run(image, *args)  # the image's default arguments
    host, port = wait_for(lambda: smtp_address(first), timeout=60, what="the MTA's SMTP port")

    status, root_mount = proc_status(first)
    assert status["Uid"].split()[:2] == [str(RUN_AS)] * 2, status["Uid"]
    assert status["Gid"].split()[:2] == [str(RUN_AS)] * 2, status["Gid"]
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, status
    assert status["NoNewPrivs"].strip() == "1"
    assert "ro" in root_mount.split()[5].split(","), root_mount

    sent = {}
    with smtplib.SMTP(host, port, timeout=60) as client:
        client.ehlo("client.test")
        for i in range(MESSAGES):
            token = f"image-{i:03d}"
            local = i % LOCAL_EVERY == 0
            rcpt = f"user{i % 3}@example.test" if local else f"user{i % 7}@remote.test"
            body = message(token)
            assert client.sendmail("sender@client.test", [rcpt], body) == {}
            sent[token] = (local, body)
    relayed = {t for t, (local, _) in sent.items() if not local}
    local_tokens = {t for t, (local, _) in sent.items() if local}

    # The sink has deferred delivery attempts, so relayed mail is queued on the volume.
    wait_for(lambda: sink.handler.refusals >= 5, timeout=120, what="deferred deliveries")
    assert sink.messages == []
    exited = stop(first)
    assert exited["ExitCode"] == 0 and not exited["OOMKilled"], (exited, logs(first))
    assert re.search(r"\bstopped\b", logs(first)), logs(first)
    assert any(p.stat().st_uid == RUN_AS for p in (data / "spool").rglob("*")), \
        "spool not written by 65532"

    # A new pod on the same volume, with the sink now accepting.
    with sink.handler.lock:
        sink.handler.rcpt_reply = None
    second = containers.run(image, *args)
    wait_for(lambda: smtp_address(second), timeout=60, what="the restarted MTA")

    def all_relayed():
        got = {token_of(m.content) for m in sink.messages}
        return got >= relayed
    wait_for(all_relayed, timeout=240, interval=0.2,
             what=f"{len(relayed)} relayed messages at the sink")
    # Maildir delivery may have happened before the restart or after it.
    maildir = data / "maildir"
    wait_for(lambda: len(list(maildir.glob("*/new/*"))) >= len(local_tokens), timeout=120,
             what="local deliveries")
    exited = stop(second)  # nothing can be delivered after this
    assert exited["ExitCode"] == 0, (exited, logs(second))

    relayed_counts = Counter(token_of(m.content) for m in sink.messages)
    assert set(relayed_counts) == relayed
    assert [t for t, n in relayed_counts.items() if n > 1] == [], "delivered twice"
    for m in sink.messages:
        token = token_of(m.content)
        assert m.content.endswith(sent[token][1]), token  # only a Received: line added
        assert m.sender == "sender@client.test"
    local_files = list(maildir.glob("*/new/*"))
    local_counts = Counter(token_of(p.read_bytes()) for p in local_files)
    assert set(local_counts) == local_tokens
    assert [t for t, n in local_counts.items() if n > 1] == [], "delivered twice"
    assert all(p.stat().st_uid == RUN_AS for p in local_files)
    print(f"\n{len(relayed)} relayed messages queued at SIGTERM ({sink.handler.refusals} "
          f"deferred attempts), each delivered once after the restart; "
          f"{len(local_tokens)} delivered into the Maildir on the volume")
