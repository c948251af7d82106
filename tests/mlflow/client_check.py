#!/usr/bin/env python3
"""Drives a real MLflow tracking server, or runcache in front of one, with the real `mlflow`
client, and checks that every read made after a write reflects that write.

Run with the python of scripts/mlflow-venv.sh's venv (mlflow 3.17.2 and requests):

    $VENV/bin/python tests/mlflow/client_check.py --uri http://127.0.0.1:5123 \
        [--second-uri http://127.0.0.1:5124] [--out result.json] [--expect-hits]

--uri is where every write goes and where each read is made first. --second-uri, when given,
is a second gateway instance in front of the same server: every read is made there too, right
after, must pass the same assertions and must give the same (normalised) answer.

The output document (JSON, to --out or stdout) has:
  transcript         every write and every read through --uri, normalised: ids become
                     placeholders (<exp1>, <run1>, <uid1>) in order of appearance, the times the
                     server chooses (creation, last update, end time) are dropped, and the times
                     the client chooses are fixed. Two runs, against MLflow directly or through a
                     gateway, give equal transcripts: compare `transcript_sha256`.
  counts             reads, writes, assertions, failed assertions.
  failures           what failed, where.
  http               every HTTP exchange (client and raw): uri label, method, path, status and the
                     cache headers (Cache-Status, X-Cache, Age) if any.
  repeated           the identical reads made several times in a row, with the Cache-Status /
                     X-Cache of each.
  cache_summary      counts of X-Cache values and of Cache-Status first members, per uri label.
Only `transcript` (and its hash) is meant to be compared between runs.

Exit status: 0 when every assertion held, 1 when one failed, 2 on an unexpected error (the
document is written in every case).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from urllib.parse import urlsplit

import requests

# Set before mlflow is imported: set_terminated() would print "View run ... at: <url with ids>".
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag, ViewType  # noqa: E402
from mlflow.entities._mlflow_object import _MlflowObject  # noqa: E402
from mlflow.store.entities.paged_list import PagedList  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

# Fixed times chosen by the client (ms since the epoch), so the transcript is deterministic.
T0 = 1_700_000_000_000
SMALL_TEXT = "hello from runcache's client_check\n"
BLOB_SIZE = 1 << 20
REPEAT = 3

# Keys whose values the server chooses from its clock: dropped from the transcript.
DROP_KEYS = {"creation_time", "last_update_time", "end_time"}
# Keys whose values are experiment ids (small integers: replaced only under these keys).
EXP_KEYS = {"experiment_id", "experiment_ids", "experimentId"}
# URIs hold an experiment id as a path segment (mlflow-artifacts:/<exp>/<run>/artifacts): in a
# string that starts with a URI scheme, or under one of these keys, digit segments that are known
# experiment ids are replaced.
URI_KEYS = {"artifact_uri", "artifact_location", "root_uri", "artifactUri", "artifactLocation"}
URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


class CheckFailed(Exception):
    pass


class Checker:
    def __init__(self, uris: list[str]):
        self.uris = uris
        self.labels = ["uri"] + ["second-uri"] * (len(uris) - 1)
        self.clients = [MlflowClient(tracking_uri=u) for u in uris]
        self.ids: dict[str, str] = {}  # id value -> placeholder
        self.counters: Counter = Counter()
        self.transcript: list[dict] = []
        self.failures: list[dict] = []
        self.http: list[dict] = []
        self.repeated: list[dict] = []
        self.reads = 0
        self.writes = 0
        self.assertions = 0
        self.step = ""  # label of the operation in progress, for the http log
        self.via = ""
        self._hook_requests()

    # ----- HTTP observation ----------------------------------------------------------------
    def _hook_requests(self):
        checker = self
        original = requests.Session.send

        def send(session, request, **kwargs):
            response = original(session, request, **kwargs)
            try:
                checker._observe(request, response)
            except Exception:  # observing must never break a request
                pass
            return response

        requests.Session.send = send

    def _observe(self, request, response):
        parts = urlsplit(request.url)
        base = f"{parts.scheme}://{parts.netloc}"
        label = next((lbl for u, lbl in zip(self.uris, self.labels) if u == base), base)
        h = response.headers
        self.http.append(
            {
                "op": self.step,
                "via": label,
                "method": request.method,
                "path": parts.path + ("?" + parts.query if parts.query else ""),
                "status": response.status_code,
                "cache_status": h.get("Cache-Status"),
                "x_cache": h.get("X-Cache"),
                "age": h.get("Age"),
            }
        )

    # ----- ids and normalisation ---------------------------------------------------------
    def register(self, kind: str, value: str) -> str:
        if value not in self.ids:
            self.counters[kind] += 1
            self.ids[value] = f"<{kind}{self.counters[kind]}>"
        return self.ids[value]

    def _norm_str(self, s: str, key: str | None) -> str:
        if s in self.ids:
            placeholder = self.ids[s]
            if not s.isdigit() or key in EXP_KEYS:
                return placeholder
        for value, placeholder in self.ids.items():
            if not value.isdigit() and len(value) >= 8 and value in s:
                s = s.replace(value, placeholder)
        if key in URI_KEYS or URI_RE.match(s):
            s = re.sub(r"(?<=[:/])(\d+)(?=/|$)", lambda m: self.ids.get(m.group(1), m.group(1)), s)
        return s

    def norm(self, obj, key: str | None = None):
        if obj is None or isinstance(obj, (bool, int, float)):
            return obj
        if isinstance(obj, str):
            return self._norm_str(obj, key)
        if isinstance(obj, PagedList):
            return {"items": self.norm(list(obj)), "token": obj.token is not None}
        if hasattr(obj, "to_dictionary"):
            return self.norm(obj.to_dictionary(), key)
        if isinstance(obj, _MlflowObject):
            return self.norm(dict(obj), key)
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if k in DROP_KEYS:
                    continue
                out[self._norm_str(k, None)] = self.norm(v, k)
            return out
        if isinstance(obj, (list, tuple)):
            items = [self.norm(v, key) for v in obj]
            # Lists of key/value entities (tags, params, metric points) have no meaningful order.
            if items and all(isinstance(i, dict) and "key" in i for i in items):
                items.sort(key=lambda i: json.dumps(i, sort_keys=True))
            return items
        return self.norm(repr(obj), key)

    # ----- recording -----------------------------------------------------------------------
    def expect(self, cond: bool, what: str, via: str):
        self.assertions += 1
        if not cond:
            self.failures.append({"op": self.step, "via": via, "assertion": what})

    def _check(self, check, result, label: str):
        if check is None:
            return
        try:
            check(result, lambda cond, what: self.expect(bool(cond), what, label))
        except Exception as e:  # an answer of the wrong shape fails the check, it does not stop the run
            self.expect(False, f"check raised {type(e).__name__}: {e}", label)

    def write(self, op: str, fn, **detail):
        self.step = op
        self.via = "uri"
        result = fn(self.clients[0])
        self.writes += 1
        entry = {"op": "write", "name": op}
        if detail:
            entry["args"] = self.norm(detail)
        entry["result"] = self.norm(result)
        self.transcript.append(entry)
        return result

    def read(self, name: str, fn, check=None):
        """fn(client, uri) -> result; check(result, expect) with expect(cond, what)."""
        self.step = name
        first = unset = object()
        for client, uri, label in zip(self.clients, self.uris, self.labels):
            self.via = label
            result = fn(client, uri)
            self.reads += 1
            self._check(check, result, label)
            n = self.norm(result)
            if first is unset:
                first = n
                self.transcript.append({"op": "read", "name": name, "result": n})
            else:
                self.expect(n == first, "same answer as through --uri", label)
        return first

    def rest(self, uri: str, method: str, path: str, params=None, body=None):
        """A raw REST call; returns {status, body} (the body parsed when it is JSON)."""
        r = requests.request(method, uri + path, params=params, json=body, timeout=60)
        try:
            parsed = r.json()
        except ValueError:
            parsed = r.text
        return {"status": r.status_code, "body": parsed}

    def repeat(self, name: str, method: str, path: str, params=None, body=None, check=None, n=REPEAT):
        """The same raw request n times in a row through each uri; all answers must be equal."""
        self.step = name
        first = unset = object()
        for uri, label in zip(self.uris, self.labels):
            self.via = label
            seen = []
            answers = []
            for _ in range(n):
                mark = len(self.http)
                answer = self.rest(uri, method, path, params, body)
                self.reads += 1
                answers.append(self.norm(answer))
                ex = self.http[mark:]
                seen.append(
                    {"cache_status": ex[-1]["cache_status"], "x_cache": ex[-1]["x_cache"]} if ex else None
                )
                self._check(check, answer, label)
            self.expect(all(a == answers[0] for a in answers), f"{n} identical reads gave equal answers", label)
            self.repeated.append({"op": name, "via": label, "method": method, "path": path, "seen": seen})
            if first is unset:
                first = answers[0]
                self.transcript.append({"op": "read", "name": name, "repeat": n, "result": first})
            else:
                self.expect(answers[0] == first, "same answer as through --uri", label)
        return first

    def document(self, error: str | None = None) -> dict:
        transcript_json = json.dumps(self.transcript, sort_keys=True, separators=(",", ":"))
        summary: dict = {}
        for e in self.http:
            s = summary.setdefault(e["via"], {"x_cache": Counter(), "cache_status": Counter(), "exchanges": 0})
            s["exchanges"] += 1
            s["x_cache"][e["x_cache"] or "-"] += 1
            cs = e["cache_status"]
            first = "-" if not cs else ";".join(p.strip() for p in cs.split(",")[-1].split(";")[1:2]) or cs
            s["cache_status"][first] += 1
        doc = {
            "mlflow_version": mlflow.__version__,
            "uris": {lbl: u for u, lbl in zip(self.uris, self.labels)},
            "counts": {
                "reads": self.reads,
                "writes": self.writes,
                "assertions": self.assertions,
                "failed_assertions": len(self.failures),
                "http_exchanges": len(self.http),
            },
            "failures": self.failures,
            "transcript_sha256": hashlib.sha256(transcript_json.encode()).hexdigest(),
            "transcript": self.transcript,
            "repeated": self.repeated,
            "cache_summary": {k: {"exchanges": v["exchanges"], "x_cache": dict(v["x_cache"]),
                                  "cache_status": dict(v["cache_status"])} for k, v in summary.items()},
            "http": self.http,
        }
        if error:
            doc["error"] = error
        return doc


# ----- helpers over results ---------------------------------------------------------------
def run_ids(runs) -> list[str]:
    return [r.info.run_id for r in runs]


def history(points) -> list[tuple]:
    return sorted((p.step, p.value) for p in points)


def rest_runs(answer) -> list[dict]:
    return (answer["body"] or {}).get("runs", []) if isinstance(answer["body"], dict) else []


def rest_tags(run: dict) -> dict:
    return {t["key"]: t.get("value") for t in run.get("data", {}).get("tags", [])}


def scenario(c: Checker, args):
    uid = uuid.uuid4().hex[:12]
    c.register("uid", uid)
    name = f"runcache-check-{uid}"
    new_name = f"{name}-renamed"
    rnd = random.Random(22)
    blob = rnd.randbytes(BLOB_SIZE)
    blob_sha = hashlib.sha256(blob).hexdigest()
    tmp = tempfile.mkdtemp(prefix="runcache-client-check-")

    # --- experiment -------------------------------------------------------------------------
    c.read("get_experiment_by_name before create", lambda cl, u: cl.get_experiment_by_name(name),
           lambda r, ok: ok(r is None, "no experiment of that name yet"))
    c.repeat("REST experiments/get-by-name before create", "GET", "/api/2.0/mlflow/experiments/get-by-name",
             params={"experiment_name": name}, check=lambda a, ok: ok(a["status"] == 404, "404 before create"))

    exp = c.write("create_experiment", lambda cl: cl.create_experiment(name, tags={"team": "runcache"}),
                  name=name)
    c.register("exp", exp)
    c.transcript[-1]["result"] = c.norm(exp, "experiment_id")

    c.read("get_experiment_by_name after create", lambda cl, u: cl.get_experiment_by_name(name),
           lambda r, ok: ok(r is not None and r.experiment_id == exp, "found by name, with the new id"))
    c.repeat("REST experiments/get-by-name after create", "GET", "/api/2.0/mlflow/experiments/get-by-name",
             params={"experiment_name": name},
             check=lambda a, ok: ok(a["status"] == 200 and a["body"]["experiment"]["experiment_id"] == exp,
                                    "200 with the new id (a cached 404 would be stale)"))
    c.read("get_experiment", lambda cl, u: cl.get_experiment(exp),
           lambda r, ok: ok(r.name == name and r.tags.get("team") == "runcache", "name and tags as created"))
    c.read("search_experiments by name",
           lambda cl, u: cl.search_experiments(filter_string=f"name = '{name}'", max_results=100),
           lambda r, ok: ok([e.experiment_id for e in r] == [exp], "the one new experiment"))
    c.repeat("REST experiments/get", "GET", "/api/2.0/mlflow/experiments/get", params={"experiment_id": exp})

    c.write("set_experiment_tag", lambda cl: cl.set_experiment_tag(exp, "stage", "dev"))
    c.read("get_experiment after set_experiment_tag", lambda cl, u: cl.get_experiment(exp),
           lambda r, ok: ok(r.tags.get("stage") == "dev", "experiment tag stage=dev"))
    c.repeat("REST experiments/get after set_experiment_tag", "GET", "/api/2.0/mlflow/experiments/get",
             params={"experiment_id": exp},
             check=lambda a, ok: ok({t["key"]: t["value"] for t in a["body"]["experiment"].get("tags", [])}
                                    .get("stage") == "dev", "REST experiment shows stage=dev"))

    # --- runs -------------------------------------------------------------------------------
    search_body = {"experiment_ids": [exp], "max_results": 100, "order_by": ["attributes.start_time ASC"]}
    c.repeat("REST runs/search (empty experiment)", "POST", "/api/2.0/mlflow/runs/search", body=search_body,
             check=lambda a, ok: ok(a["status"] == 200 and rest_runs(a) == [], "no runs yet"))

    runs = []
    for i, rname in enumerate(["alpha", "beta", "gamma"]):
        run = c.write(f"create_run {rname}",
                      lambda cl, i=i, rname=rname: cl.create_run(exp, start_time=T0 + i * 1000,
                                                                 tags={"kind": "check", "index": str(i)},
                                                                 run_name=rname))
        rid = run.info.run_id
        c.register("run", rid)
        c.transcript[-1]["result"] = c.norm(run)
        runs.append(rid)
        expected = list(runs)
        c.read(f"search_runs after create_run {rname}",
               lambda cl, u: cl.search_runs([exp], order_by=["attributes.start_time ASC"], max_results=100),
               lambda r, ok, expected=expected: ok(run_ids(r) == expected, f"{len(expected)} runs in order"))
        c.repeat(f"REST runs/search after create_run {rname}", "POST", "/api/2.0/mlflow/runs/search",
                 body=search_body,
                 check=lambda a, ok, expected=expected: ok([r["info"]["run_id"] for r in rest_runs(a)] == expected,
                                                           "REST search lists the new run"))
        c.read(f"get_run {rname}", lambda cl, u, rid=rid: cl.get_run(rid),
               lambda r, ok, rname=rname: ok(r.info.run_name == rname and r.info.status == "RUNNING",
                                             "name and RUNNING"))
    r1, r2, r3 = runs

    c.repeat("REST runs/get alpha", "GET", "/api/2.0/mlflow/runs/get", params={"run_id": r1})

    # --- params -----------------------------------------------------------------------------
    c.write("log_param alpha lr", lambda cl: cl.log_param(r1, "lr", "0.01"))
    c.read("get_run alpha after log_param", lambda cl, u: cl.get_run(r1),
           lambda r, ok: ok(r.data.params.get("lr") == "0.01", "param lr=0.01"))
    c.repeat("REST runs/get alpha after log_param", "GET", "/api/2.0/mlflow/runs/get", params={"run_id": r1},
             check=lambda a, ok: ok({p["key"]: p["value"] for p in a["body"]["run"]["data"].get("params", [])}
                                    .get("lr") == "0.01", "REST run shows lr=0.01"))
    c.read("search_runs params.lr = '0.01'",
           lambda cl, u: cl.search_runs([exp], filter_string="params.lr = '0.01'", max_results=100),
           lambda r, ok: ok(run_ids(r) == [r1], "only alpha"))

    # --- metrics ----------------------------------------------------------------------------
    c.read("get_metric_history alpha loss (none yet)", lambda cl, u: cl.get_metric_history(r1, "loss"),
           lambda r, ok: ok(r == [], "no points yet"))
    c.repeat("REST metrics/get-history alpha loss (none yet)", "GET", "/api/2.0/mlflow/metrics/get-history",
             params={"run_id": r1, "metric_key": "loss"})

    c.write("log_metric alpha loss step 0",
            lambda cl: cl.log_metric(r1, "loss", 0.9, timestamp=T0 + 10, step=0))
    c.read("get_metric_history alpha loss after 1 point", lambda cl, u: cl.get_metric_history(r1, "loss"),
           lambda r, ok: ok(history(r) == [(0, 0.9)], "history has the point"))
    c.repeat("REST metrics/get-history alpha loss after 1 point", "GET", "/api/2.0/mlflow/metrics/get-history",
             params={"run_id": r1, "metric_key": "loss"},
             check=lambda a, ok: ok([(m["step"], m["value"]) for m in a["body"].get("metrics", [])] == [(0, 0.9)],
                                    "REST history has the point"))
    c.read("search_runs after log_metric",
           lambda cl, u: cl.search_runs([exp], order_by=["attributes.start_time ASC"], max_results=100),
           lambda r, ok: ok(r[0].data.metrics.get("loss") == 0.9, "search shows latest loss 0.9"))

    c.write("log_metric alpha loss step 1",
            lambda cl: cl.log_metric(r1, "loss", 0.7, timestamp=T0 + 20, step=1))
    c.read("get_metric_history alpha loss after 2 points", lambda cl, u: cl.get_metric_history(r1, "loss"),
           lambda r, ok: ok(history(r) == [(0, 0.9), (1, 0.7)], "history has both points"))
    c.repeat("REST metrics/get-history alpha loss after 2 points", "GET", "/api/2.0/mlflow/metrics/get-history",
             params={"run_id": r1, "metric_key": "loss"},
             check=lambda a, ok: ok(sorted((m["step"], m["value"]) for m in a["body"].get("metrics", []))
                                    == [(0, 0.9), (1, 0.7)], "REST history has both points"))
    c.read("get_run alpha after 2 points", lambda cl, u: cl.get_run(r1),
           lambda r, ok: ok(r.data.metrics.get("loss") == 0.7, "latest loss 0.7"))
    c.repeat("REST runs/search after 2 points", "POST", "/api/2.0/mlflow/runs/search", body=search_body,
             check=lambda a, ok: ok({m["key"]: m["value"] for m in rest_runs(a)[0]["data"].get("metrics", [])}
                                    .get("loss") == 0.7, "REST search shows latest loss 0.7"))

    beta_loss = [(s, round(1.0 - 0.15 * s, 4)) for s in range(5)]
    beta_acc = [(s, round(0.5 + 0.1 * s, 4)) for s in range(5)]
    c.read("get_metric_history beta loss (none yet)", lambda cl, u: cl.get_metric_history(r2, "loss"),
           lambda r, ok: ok(r == [], "no points yet"))
    c.write("log_batch beta",
            lambda cl: cl.log_batch(
                r2,
                metrics=[Metric("loss", v, T0 + 100 + s, s) for s, v in beta_loss]
                + [Metric("acc", v, T0 + 100 + s, s) for s, v in beta_acc],
                params=[Param("lr", "0.02"), Param("opt", "adam")],
                tags=[RunTag("phase", "train")]))
    c.read("get_metric_history beta loss after log_batch", lambda cl, u: cl.get_metric_history(r2, "loss"),
           lambda r, ok: ok(history(r) == beta_loss, "5 loss points"))
    c.read("get_metric_history beta acc after log_batch", lambda cl, u: cl.get_metric_history(r2, "acc"),
           lambda r, ok: ok(history(r) == beta_acc, "5 acc points"))
    c.read("get_run beta after log_batch", lambda cl, u: cl.get_run(r2),
           lambda r, ok: ok(r.data.metrics == {"loss": beta_loss[-1][1], "acc": beta_acc[-1][1]}
                            and r.data.params == {"lr": "0.02", "opt": "adam"}
                            and r.data.tags.get("phase") == "train", "latest metrics, params and tag"))

    gamma_loss = [(s, round(0.8 - 0.05 * s, 4)) for s in range(3)]
    c.write("log_batch gamma",
            lambda cl: cl.log_batch(r3, metrics=[Metric("loss", v, T0 + 200 + s, s) for s, v in gamma_loss],
                                    params=[Param("lr", "0.03")]))
    c.read("search_runs metrics.loss < 0.75 order_by metrics.loss ASC",
           lambda cl, u: cl.search_runs([exp], filter_string="metrics.loss < 0.75",
                                        order_by=["metrics.loss ASC"], max_results=100),
           lambda r, ok: ok(run_ids(r) == [r2, r3, r1], "beta 0.4, then the 0.7 ties by start_time DESC"))
    c.read("search_runs order_by params.lr DESC",
           lambda cl, u: cl.search_runs([exp], order_by=["params.lr DESC"], max_results=100),
           lambda r, ok: ok(run_ids(r) == [r3, r2, r1], "gamma, beta, alpha"))

    # --- tags -------------------------------------------------------------------------------
    c.write("set_tag alpha note", lambda cl: cl.set_tag(r1, "note", "first"))
    c.read("get_run alpha after set_tag", lambda cl, u: cl.get_run(r1),
           lambda r, ok: ok(r.data.tags.get("note") == "first", "tag note=first"))
    c.repeat("REST runs/get alpha after set_tag", "GET", "/api/2.0/mlflow/runs/get", params={"run_id": r1},
             check=lambda a, ok: ok(rest_tags(a["body"]["run"]).get("note") == "first", "REST run shows the tag"))
    c.read("search_runs tags.note = 'first'",
           lambda cl, u: cl.search_runs([exp], filter_string="tags.note = 'first'", max_results=100),
           lambda r, ok: ok(run_ids(r) == [r1], "only alpha"))

    c.write("delete_tag alpha note", lambda cl: cl.delete_tag(r1, "note"))
    c.read("get_run alpha after delete_tag", lambda cl, u: cl.get_run(r1),
           lambda r, ok: ok("note" not in r.data.tags, "tag note gone"))
    c.repeat("REST runs/get alpha after delete_tag", "GET", "/api/2.0/mlflow/runs/get", params={"run_id": r1},
             check=lambda a, ok: ok("note" not in rest_tags(a["body"]["run"]), "REST run without the tag"))
    c.read("search_runs tags.note = 'first' after delete_tag",
           lambda cl, u: cl.search_runs([exp], filter_string="tags.note = 'first'", max_results=100),
           lambda r, ok: ok(run_ids(r) == [], "none"))

    # --- artifacts --------------------------------------------------------------------------
    c.read("list_artifacts alpha (none yet)", lambda cl, u: cl.list_artifacts(r1),
           lambda r, ok: ok(r == [], "no artifacts yet"))
    c.repeat("REST artifacts/list alpha (none yet)", "GET", "/api/2.0/mlflow/artifacts/list",
             params={"run_id": r1})
    small = os.path.join(tmp, "hello.txt")
    with open(small, "w") as f:
        f.write(SMALL_TEXT)
    big = os.path.join(tmp, "blob.bin")
    with open(big, "wb") as f:
        f.write(blob)

    c.write("log_artifact alpha hello.txt", lambda cl: cl.log_artifact(r1, small))
    c.read("list_artifacts alpha after hello.txt", lambda cl, u: cl.list_artifacts(r1),
           lambda r, ok: ok([(a.path, a.is_dir, a.file_size) for a in r] == [("hello.txt", False, len(SMALL_TEXT))],
                            "hello.txt listed with its size"))
    c.repeat("REST artifacts/list alpha after hello.txt", "GET", "/api/2.0/mlflow/artifacts/list",
             params={"run_id": r1},
             check=lambda a, ok: ok([f["path"] for f in a["body"].get("files", [])] == ["hello.txt"],
                                    "REST list shows hello.txt"))

    c.write("log_artifact alpha data/blob.bin", lambda cl: cl.log_artifact(r1, big, artifact_path="data"))
    c.read("list_artifacts alpha after blob.bin", lambda cl, u: cl.list_artifacts(r1),
           lambda r, ok: ok(sorted((a.path, a.is_dir) for a in r) == [("data", True), ("hello.txt", False)],
                            "data/ and hello.txt"))
    c.read("list_artifacts alpha data/", lambda cl, u: cl.list_artifacts(r1, "data"),
           lambda r, ok: ok([(a.path, a.file_size) for a in r] == [("data/blob.bin", BLOB_SIZE)],
                            "data/blob.bin with its size"))
    c.repeat("REST artifacts/list alpha data/", "GET", "/api/2.0/mlflow/artifacts/list",
             params={"run_id": r1, "path": "data"},
             check=lambda a, ok: ok([(f["path"], int(f.get("file_size", -1))) for f in a["body"].get("files", [])]
                                    == [("data/blob.bin", BLOB_SIZE)], "REST list shows data/blob.bin"))

    def download(cl, u, path):
        dst = tempfile.mkdtemp(dir=tmp)
        local = cl.download_artifacts(r1, path, dst)
        with open(local, "rb") as f:
            data = f.read()
        return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    c.read("download_artifacts hello.txt", lambda cl, u: download(cl, u, "hello.txt"),
           lambda r, ok: ok(r["sha256"] == hashlib.sha256(SMALL_TEXT.encode()).hexdigest(), "same bytes"))
    c.read("download_artifacts data/blob.bin", lambda cl, u: download(cl, u, "data/blob.bin"),
           lambda r, ok: ok(r["size"] == BLOB_SIZE and r["sha256"] == blob_sha, "same 1 MiB"))

    # --- update, terminate ------------------------------------------------------------------
    c.write("update_run alpha FINISHED alpha-done", lambda cl: cl.update_run(r1, status="FINISHED", name="alpha-done"))
    c.read("get_run alpha after update_run", lambda cl, u: cl.get_run(r1),
           lambda r, ok: ok(r.info.status == "FINISHED" and r.info.run_name == "alpha-done"
                            and r.data.tags.get("mlflow.runName") == "alpha-done", "FINISHED, renamed"))
    c.repeat("REST runs/get alpha after update_run", "GET", "/api/2.0/mlflow/runs/get", params={"run_id": r1},
             check=lambda a, ok: ok(a["body"]["run"]["info"]["status"] == "FINISHED"
                                    and a["body"]["run"]["info"]["run_name"] == "alpha-done", "REST run updated"))
    c.read("search_runs status FINISHED",
           lambda cl, u: cl.search_runs([exp], filter_string="attributes.status = 'FINISHED'", max_results=100),
           lambda r, ok: ok(run_ids(r) == [r1], "only alpha"))
    c.read("search_runs run_name alpha-done",
           lambda cl, u: cl.search_runs([exp], filter_string="attributes.run_name = 'alpha-done'", max_results=100),
           lambda r, ok: ok(run_ids(r) == [r1], "found by its new name"))

    c.write("set_terminated beta FAILED", lambda cl: cl.set_terminated(r2, "FAILED"))
    c.read("get_run beta after set_terminated", lambda cl, u: cl.get_run(r2),
           lambda r, ok: ok(r.info.status == "FAILED" and r.info.end_time is not None, "FAILED with an end time"))

    # --- delete, restore --------------------------------------------------------------------
    c.repeat("REST runs/search before delete_run", "POST", "/api/2.0/mlflow/runs/search", body=search_body,
             check=lambda a, ok: ok(len(rest_runs(a)) == 3, "3 active runs"))
    c.write("delete_run gamma", lambda cl: cl.delete_run(r3))
    c.read("search_runs ACTIVE_ONLY after delete_run",
           lambda cl, u: cl.search_runs([exp], run_view_type=ViewType.ACTIVE_ONLY,
                                        order_by=["attributes.start_time ASC"], max_results=100),
           lambda r, ok: ok(run_ids(r) == [r1, r2], "gamma excluded"))
    c.read("search_runs DELETED_ONLY after delete_run",
           lambda cl, u: cl.search_runs([exp], run_view_type=ViewType.DELETED_ONLY, max_results=100),
           lambda r, ok: ok(run_ids(r) == [r3], "only gamma"))
    c.repeat("REST runs/search after delete_run", "POST", "/api/2.0/mlflow/runs/search", body=search_body,
             check=lambda a, ok: ok([r["info"]["run_id"] for r in rest_runs(a)] == [r1, r2], "REST: gamma excluded"))
    c.read("get_run gamma after delete_run", lambda cl, u: cl.get_run(r3),
           lambda r, ok: ok(r.info.lifecycle_stage == "deleted", "lifecycle deleted"))

    c.write("restore_run gamma", lambda cl: cl.restore_run(r3))
    c.read("search_runs ACTIVE_ONLY after restore_run",
           lambda cl, u: cl.search_runs([exp], order_by=["attributes.start_time ASC"], max_results=100),
           lambda r, ok: ok(run_ids(r) == [r1, r2, r3], "gamma back"))
    c.repeat("REST runs/search after restore_run", "POST", "/api/2.0/mlflow/runs/search", body=search_body,
             check=lambda a, ok: ok(len(rest_runs(a)) == 3, "REST: 3 runs again"))
    c.read("get_run gamma after restore_run", lambda cl, u: cl.get_run(r3),
           lambda r, ok: ok(r.info.lifecycle_stage == "active", "lifecycle active"))

    # --- fluent APIs ------------------------------------------------------------------------
    def fluent_search(cl, u):
        mlflow.set_tracking_uri(u)
        return mlflow.search_runs(experiment_ids=[exp], output_format="list", order_by=["attributes.start_time ASC"])

    c.read("fluent search_runs", fluent_search, lambda r, ok: ok(run_ids(r) == [r1, r2, r3], "3 runs"))

    # --- rename experiment ------------------------------------------------------------------
    c.repeat("REST experiments/get-by-name before rename", "GET", "/api/2.0/mlflow/experiments/get-by-name",
             params={"experiment_name": name}, check=lambda a, ok: ok(a["status"] == 200, "found"))
    c.write("rename_experiment", lambda cl: cl.rename_experiment(exp, new_name), new_name=new_name)
    c.read("get_experiment_by_name new name", lambda cl, u: cl.get_experiment_by_name(new_name),
           lambda r, ok: ok(r is not None and r.experiment_id == exp, "found by the new name"))
    c.read("get_experiment_by_name old name", lambda cl, u: cl.get_experiment_by_name(name),
           lambda r, ok: ok(r is None, "old name gone"))
    c.repeat("REST experiments/get-by-name old name after rename", "GET",
             "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name},
             check=lambda a, ok: ok(a["status"] == 404, "404 for the old name (a cached 200 would be stale)"))
    c.read("get_experiment after rename", lambda cl, u: cl.get_experiment(exp),
           lambda r, ok: ok(r.name == new_name, "new name"))

    def fluent_set_experiment(cl, u):
        mlflow.set_tracking_uri(u)
        return mlflow.set_experiment(new_name)

    c.read("fluent set_experiment new name", fluent_set_experiment,
           lambda r, ok: ok(r.experiment_id == exp, "same experiment"))

    # --- the UI's reads (ajax-api), and repeated reads with no write in between --------------
    ui_body = {"experiment_ids": [exp], "filter": "", "run_view_type": "ACTIVE_ONLY", "max_results": 100,
               "order_by": ["attributes.start_time DESC"]}
    c.repeat("ajax-api runs/search (UI shape)", "POST", "/ajax-api/2.0/mlflow/runs/search", body=ui_body,
             check=lambda a, ok: ok([r["info"]["run_id"] for r in rest_runs(a)] == [r3, r2, r1], "3 runs, newest first"))
    c.repeat("ajax-api metrics/get-history-bulk-interval loss", "GET",
             "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
             params={"run_ids": [r1, r2, r3], "metric_key": "loss", "max_results": 320},
             check=lambda a, ok: ok(len(a["body"].get("metrics", [])) == 2 + 5 + 3, "10 loss points"))
    c.repeat("ajax-api experiments/search (UI list)", "GET", "/ajax-api/2.0/mlflow/experiments/search",
             params={"max_results": 1000, "filter": f"name = '{new_name}'"},
             check=lambda a, ok: ok([e["experiment_id"] for e in a["body"].get("experiments", [])] == [exp],
                                    "the renamed experiment"))
    c.repeat("REST runs/get beta (final)", "GET", "/api/2.0/mlflow/runs/get", params={"run_id": r2})
    c.repeat("REST metrics/get-history beta acc (final)", "GET", "/api/2.0/mlflow/metrics/get-history",
             params={"run_id": r2, "metric_key": "acc"})

    # --- delete the experiment (unless --keep) ----------------------------------------------
    if not args.keep:
        c.write("delete_experiment", lambda cl: cl.delete_experiment(exp))
        c.read("get_experiment after delete_experiment", lambda cl, u: cl.get_experiment(exp),
               lambda r, ok: ok(r.lifecycle_stage == "deleted", "lifecycle deleted"))
        c.read("search_experiments ACTIVE_ONLY after delete_experiment",
               lambda cl, u: cl.search_experiments(filter_string=f"name = '{new_name}'", max_results=100),
               lambda r, ok: ok(list(r) == [], "gone from the active list"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uri", required=True, help="tracking URI: MLflow itself or a gateway")
    ap.add_argument("--second-uri", help="a second gateway instance in front of the same server")
    ap.add_argument("--out", help="where to write the JSON document (default: stdout)")
    ap.add_argument("--keep", action="store_true", help="leave the experiment undeleted")
    ap.add_argument("--expect-hits", action="store_true",
                    help="also fail unless some repeated read through each uri was a cache hit")
    args = ap.parse_args()

    uris = [args.uri.rstrip("/")] + ([args.second_uri.rstrip("/")] if args.second_uri else [])
    checker = Checker(uris)
    error = None
    started = time.monotonic()
    try:
        scenario(checker, args)
        if args.expect_hits:
            checker.step = "expect-hits"
            for label in sorted(set(checker.labels)):
                hits = sum(1 for r in checker.repeated if r["via"] == label for s in r["seen"]
                           if s and ((s["x_cache"] or "").upper() == "HIT"
                                     or re.search(r";\s*hit\b", s["cache_status"] or "")))
                checker.expect(hits > 0, "some repeated read was a cache hit", label)
    except Exception:
        error = f"during {checker.step!r} via {checker.via}: {traceback.format_exc()}"
    doc = checker.document(error)
    doc["elapsed_s"] = round(time.monotonic() - started, 2)
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    counts = doc["counts"]
    print(f"client_check: {counts['writes']} writes, {counts['reads']} reads, {counts['assertions']} assertions, "
          f"{counts['failed_assertions']} failed; transcript {doc['transcript_sha256'][:16]}; "
          f"{doc['elapsed_s']}s", file=sys.stderr)
    for f in doc["failures"]:
        print(f"client_check: FAILED {f['op']} via {f['via']}: {f['assertion']}", file=sys.stderr)
    if error:
        print(f"client_check: ERROR {error}", file=sys.stderr)
        return 2
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
