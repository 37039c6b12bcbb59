"""Helpers of charts/petrel/tests/check.sh (run with the tools' Python: PyYAML, jsonschema).

  split RENDERED OUTDIR        one file per document, grouped by who can validate it
  crs CRD_DIR FILE...          custom resources against their CRD's schema (unknown fields refused)
  checkov ALLOWLIST JSON...    checkov's results (one file per value set) against the allowlist
  readme SCHEMA README         every value the schema defines is named in the README
"""

import json
import pathlib
import re
import sys

import jsonschema
import yaml

PETREL_GROUP = "mail.petrel.dev"


def split(rendered, outdir):
    """Writes each document of RENDERED to OUTDIR/{builtin,petrel,other}/NNN-kind-name.yaml.

    builtin: Kubernetes' own kinds (kubernetes-validate knows them); petrel: our CRs
    (checked against manifests/crds/); other: kinds whose CRDs are not ours (ServiceMonitor).
    """
    out = pathlib.Path(outdir)
    counts = {"builtin": 0, "petrel": 0, "other": 0}
    docs = list(yaml.safe_load_all(pathlib.Path(rendered).read_text()))
    n = 0
    for doc in docs:
        if not doc:
            continue
        n += 1
        api_version = doc.get("apiVersion", "")
        group = api_version.split("/")[0] if "/" in api_version else ""
        if group == PETREL_GROUP:
            kind_dir = "petrel"
        elif group.endswith(".k8s.io") or "." not in group:
            kind_dir = "builtin"
        else:
            kind_dir = "other"
        counts[kind_dir] += 1
        name = doc.get("metadata", {}).get("name", "unnamed")
        path = out / kind_dir / f"{n:03d}-{doc.get('kind', 'Unknown').lower()}-{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    if n == 0:
        sys.exit(f"checks split: {rendered} has no objects")
    print(" ".join(f"{k}={v}" for k, v in counts.items()))


def _strict(schema):
    """The CRD schema as the API server applies it with field validation Strict: unknown
    fields are errors unless the schema keeps them (preserve-unknown-fields or a map)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        if schema.get("nullable"):
            schema["type"] = [schema.get("type", "object"), "null"]
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crs(crd_dir, files):
    """Validates each CR file against the served version's openAPIV3Schema. (CEL rules are
    the API server's to run; `kubectl apply --dry-run=server` checks those.)"""
    schemas = {}
    for path in sorted(pathlib.Path(crd_dir).glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            schemas[key] = _strict(version["schema"]["openAPIV3Schema"])
    failed = 0
    for f in files:
        doc = yaml.safe_load(pathlib.Path(f).read_text())
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in schemas:
            print(f"FAIL {f}: no CRD in {crd_dir} serves {key[0]} {key[1]}")
            failed += 1
            continue
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
        errors = sorted(
            jsonschema.Draft7Validator(schemas[key]).iter_errors(body), key=lambda e: list(e.path)
        )
        for e in errors:
            where = ".".join(str(p) for p in e.absolute_path) or "(root)"
            print(f"FAIL {f}: {where}: {e.message}")
        failed += bool(errors)
    if failed:
        sys.exit(1)
    print(f"{len(files)} custom resources valid against {crd_dir}")


def checkov(allowlist_path, *results_paths):
    """Fails on a failed check the allowlist does not cover, and on an allowlist entry that
    nothing fails any more. The value set is the name of the folder a file was in; an
    entry's `resources` and `not_in` (value sets) narrow where it applies."""
    allowlist = yaml.safe_load(pathlib.Path(allowlist_path).read_text()) or []
    for entry in allowlist:
        if not entry.get("id") or not str(entry.get("reason", "")).strip():
            sys.exit(f"{allowlist_path}: every entry needs an id and a reason: {entry}")
    reports = []
    for results_path in results_paths:
        data = json.loads(pathlib.Path(results_path).read_text())
        reports += data if isinstance(data, list) else [data]
    passed = failed_total = 0
    used = set()
    bad = []
    allowed = []
    for report in reports:
        if report.get("summary", {}).get("parsing_errors"):
            sys.exit(f"checkov could not parse: {report['results'].get('parsing_errors')}")
        passed += report["summary"]["passed"]
        for check in report["results"].get("failed_checks", []):
            failed_total += 1
            values = pathlib.Path(check["file_abs_path"]).parent.name
            line = f"{check['check_id']} {check['resource']} [{values}]: {check['check_name']}"
            for i, entry in enumerate(allowlist):
                if (
                    entry["id"] == check["check_id"]
                    and check["resource"] in entry.get("resources", [check["resource"]])
                    and values not in entry.get("not_in", [])
                ):
                    used.add(i)
                    allowed.append(line)
                    break
            else:
                bad.append(line)
    print(f"checkov: {passed} passed, {failed_total} failed, of which {len(allowed)} allowlisted")
    for i, entry in enumerate(allowlist):
        reason = " ".join(str(entry["reason"]).split())
        count = sum(1 for line in allowed if line.startswith(entry["id"] + " "))
        print(f"  allowlisted {entry['id']} ({count}x): {reason}")
    stale = [allowlist[i]["id"] for i in range(len(allowlist)) if i not in used]
    for line in bad:
        print(f"FAIL checkov {line}")
    for check_id in stale:
        print(f"FAIL {allowlist_path}: {check_id} no longer fails anywhere; remove the entry")
    if bad or stale:
        sys.exit(1)


def _leaves(schema, prefix=""):
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        if sub.get("additionalProperties") is False and sub.get("properties"):
            yield from _leaves(sub, path + ".")
        else:
            yield path


def readme(schema_path, readme_path):
    schema = json.loads(pathlib.Path(schema_path).read_text())
    text = pathlib.Path(readme_path).read_text()
    table_keys = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", text, re.M))
    leaves = [p for p in _leaves(schema) if p != "global"]
    missing = [p for p in leaves if p not in table_keys]
    unknown = sorted(table_keys - set(leaves))
    for p in missing:
        print(f"FAIL {readme_path}: value `{p}` is not in the values table")
    for p in unknown:
        print(f"FAIL {readme_path}: the values table names `{p}`, which the schema does not define")
    if missing or unknown:
        sys.exit(1)
    print(f"{len(leaves)} values documented in {readme_path}")


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["help"]
    if command == "split":
        split(*args)
    elif command == "crs":
        crs(args[0], args[1:])
    elif command == "checkov":
        checkov(*args)
    elif command == "readme":
        readme(*args)
    else:
        sys.exit(__doc__)
