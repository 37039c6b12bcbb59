"""The config file as the contract between operator and MTA: every config
petrel-operator renders passes petrel-mta check-config and runs; and a running MTA picks
up a changed file (domains, listeners) without a restart, refusing an invalid one."""

import os
import smtplib
import subprocess
from pathlib import Path

import yaml

from conftest import BIN, ROOT, Mta, config, maildir_files, wait_for

OPERATOR = BIN.parent / "petrel-operator"


def rendered_configs():
    out = subprocess.run([str(OPERATOR), "render", "-f", str(ROOT / "manifests" / "examples")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    configs = [d["data"]["mta.yaml"] for d in docs
               if d.get("kind") == "ConfigMap" and "mta.yaml" in d.get("data", {})]
    assert configs, "render produced MTA configs"
    return configs


def test_every_rendered_config_passes_check_config(workdir):
    for i, text in enumerate(rendered_configs()):
        path = workdir / f"rendered-{i}.yaml"
        path.write_text(text)
        # The files it names are the pod's mounts: the document is what is checked here.
        out = subprocess.run([str(BIN), "check-config", "--document-only", str(path)],
                             capture_output=True, text=True)
        assert out.returncode == 0, f"{text}\n{out.stderr}"


def test_mta_runs_a_rendered_config_and_accepts_mail(workdir):
    config_doc = yaml.safe_load(rendered_configs()[0])
    # Only what a pod gets from its mounts changes: paths and the listen address.
    for listener in config_doc["listeners"]:
        listener["address"] = "127.0.0.1:0"
    config_doc["spool"]["path"] = str(workdir / "spool")
    config_doc["admin"] = {"address": "127.0.0.1:0"}
    config_doc["http"] = {"address": "127.0.0.1:0"}
    config_doc["tls"] = {"cert_file": str(workdir / "tls/cert.pem"),
                         "key_file": str(workdir / "tls/key.pem"),
                         "generate_self_signed": True}
    if config_doc["smtpd"].get("auth_users_file"):
        users = workdir / "users"
        subprocess.run([str(BIN), "passwd", "u@example.com", "--file", str(users)],
                       input="pw\n", text=True, check=True, capture_output=True)
        config_doc["smtpd"]["auth_users_file"] = str(users)
    domain = None
    for d in config_doc["local_domains"]:
        if "maildir" in d["delivery"]:
            d["delivery"]["maildir"]["root"] = str(workdir / "maildir" / d["name"])
            domain = domain or d
    assert domain, "a Maildir domain in the rendered config"
    mta = Mta(workdir, yaml.safe_dump(config_doc)).start()
    try:
        user = (domain.get("recipients") or ["postmaster"])[0]
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
            s.sendmail("a@remote.test", [f"{user}@{domain['name']}"],
                       b"Subject: rendered\r\n\r\nhi\r\n")
        wait_for(lambda: maildir_files(workdir / "maildir" / domain["name"], user),
                 what="delivery")
    finally:
        mta.kill()


def swap_config(path: Path, text: str):
    """Replace the file the way a ConfigMap mount does: new file, atomic rename."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.rename(tmp, path)


def rcpt_code(host, port, address):
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.ehlo("c.test")
        s.mail("a@remote.test")
        return s.rcpt(address)[0]


def test_changed_config_file_reconfigures_without_restart(workdir):
    base = config(workdir)
    mta = Mta(workdir, base).start()
    try:
        pid = mta.proc.pid
        assert rcpt_code(mta.host, mta.port, "x@new.test") == 550
        new_domain = (f"  - name: new.test\n    delivery:\n      maildir:\n"
                      f"        root: {workdir / 'new'}\n")
        swap_config(mta.config_path, base + new_domain)
        wait_for(lambda: rcpt_code(mta.host, mta.port, "x@new.test") == 250,
                 what="new.test accepted after reload")
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
            s.sendmail("a@remote.test", ["x@new.test"], b"Subject: r\r\n\r\nhi\r\n")
        wait_for(lambda: maildir_files(workdir / "new", "x"), what="delivery")

        # An invalid file is refused; the running config stays.
        swap_config(mta.config_path, base + "smtpd:\n  bogus: 1\n")
        wait_for(lambda: "config reload refused" in mta.log(), what="refusal logged")
        assert rcpt_code(mta.host, mta.port, "x@new.test") == 250

        # A second listener appears (on another address) while the first keeps serving.
        second = base.replace("listeners:\n  - address: 127.0.0.1:0\n",
                              "listeners:\n  - address: 127.0.0.1:0\n  - address: 127.0.0.2:0\n")
        swap_config(mta.config_path, second + new_domain)
        line = wait_for(lambda: next((l for l in mta.stdout_lines if "127.0.0.2:" in l), None),
                        what="second listener")
        port2 = int(line.rsplit(":", 1)[1])
        assert rcpt_code("127.0.0.2", port2, "x@example.test") == 250
        assert mta.proc.pid == pid and mta.proc.poll() is None, "no restart"
    finally:
        mta.kill()


def test_rendered_dkim_key_signs_mail_that_dkimpy_verifies(workdir):
    """The operator→MTA signing contract with real keys: an rsa-2048 DkimKey renders a key
    Secret; once that Secret says Active (as the operator's rotation records it), the
    listener gets a signing `dkim.keys` entry; the MTA, given the Secret's file where the pod
    would mount it, signs relayed mail, and dkimpy verifies it with the record the Secret
    publishes."""
    import base64
    import dkim
    from outbound import Sink, free_port

    examples = ROOT / "manifests" / "examples"
    crs = workdir / "crs"
    crs.mkdir()
    for name in ("01-smtplistener.yaml", "02-maildomain.yaml"):
        (crs / name).write_text((examples / name).read_text())
    (crs / "03-dkimkey.yaml").write_text("""\
apiVersion: mail.petrel.dev/v1alpha1
kind: DkimKey
metadata: {name: example-com-ed25519, namespace: mail}
spec: {domain: example.com, algorithm: rsa-2048}
""")

    def render():
        out = subprocess.run([str(OPERATOR), "render", "-f", str(crs)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    docs = render()
    secret = next(d for d in docs if d.get("kind") == "Secret"
                  and d["metadata"]["name"] == "example-com-ed25519-petrel-a")
    assert secret["metadata"]["annotations"]["mail.petrel.dev/dkim-phase"] == "Generated"
    config = yaml.safe_load(next(d["data"]["mta.yaml"] for d in docs
                                 if d.get("kind") == "ConfigMap"))
    assert not config.get("dkim", {}).get("keys"), "a Generated key signs nothing"
    # The rotation made it Active (its record published, the pods loaded it).
    secret["metadata"]["annotations"]["mail.petrel.dev/dkim-phase"] = "Active"
    (crs / "04-key-secret.yaml").write_text(yaml.safe_dump(secret))
    docs = render()
    private_pem = base64.b64decode(secret["data"]["private.pem"])
    record = base64.b64decode(secret["data"]["dns.txt"])
    assert b"k=rsa" in record
    config_doc = yaml.safe_load(next(d["data"]["mta.yaml"] for d in docs
                                     if d.get("kind") == "ConfigMap"))
    (key,) = config_doc["dkim"]["keys"]
    assert (key["domain"], key["selector"]) == ("example.com", "petrel-a")
    assert key["key_file"] == "/etc/petrel/dkim/example-com-ed25519-petrel-a.pem"
    # The listener's DKIM Secret (mounted at /etc/petrel/dkim) carries a copy of the key.
    listener_keys = next(d for d in docs if d.get("kind") == "Secret"
                         and d["metadata"]["name"] == "mx-dkim")
    assert base64.b64decode(listener_keys["data"]["example-com-ed25519-petrel-a.pem"]) == \
        private_pem
    # What the pod's Secret mount provides, at a path of this test.
    key_file = workdir / "private.pem"
    key_file.write_bytes(private_pem)
    key["key_file"] = str(key_file)
    port = free_port()
    sink = Sink("127.0.0.1", port)
    config_doc["listeners"] = [{"address": "127.0.0.1:0"}]
    config_doc["spool"]["path"] = str(workdir / "spool")
    config_doc["admin"] = {"address": "127.0.0.1:0"}
    config_doc["http"] = {"address": "127.0.0.1:0"}
    config_doc.pop("tls", None)
    config_doc["smtpd"].pop("auth_users_file", None)
    config_doc["local_domains"] = []
    config_doc["relay"] = {"client_networks": ["127.0.0.0/8"]}
    config_doc["routes"] = [{"domain": "*", "smarthost": f"127.0.0.1:{port}", "tls": "none"}]
    mta = Mta(workdir, yaml.safe_dump(config_doc)).start()
    try:
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
            s.sendmail("alice@example.com", ["bob@remote.test"],
                       b"From: alice@example.com\r\nTo: bob@remote.test\r\n"
                       b"Subject: signed by a rendered key\r\n\r\nHello.\r\n")
        got = wait_for(lambda: sink.messages, what="relayed message")[0].content
        assert b"DKIM-Signature:" in got and b"s=petrel-a" in got

        def dnsfunc(name, timeout=5):
            assert name == b"petrel-a._domainkey.example.com.", name
            return record

        assert dkim.verify(got, dnsfunc=dnsfunc), "dkimpy verifies the signature"
    finally:
        mta.kill()
        sink.stop()
