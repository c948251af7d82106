#!/usr/bin/env python3
"""Prints the route table of the installed MLflow server (run with the venv's python):
one line per (methods, path, handler), from the Flask app (the protobuf RPCs, registered by
mlflow.server.handlers.get_endpoints at /api/<v>.0/... and /ajax-api/<v>.0/..., plus /graphql,
/get-artifact, /health ...) and then the FastAPI routes mounted in front of it (OTLP, jobs,
gateway, assistant, streamed artifacts, server-info). tests/mlflow/ROUTES.md was written from it.

    $VENV/bin/python tests/mlflow/dump_routes.py > routes.txt
"""
import logging
import warnings

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import mlflow  # noqa: E402
from mlflow.server import app as flask_app  # noqa: E402
from mlflow.server.fastapi_app import app as fastapi_app  # noqa: E402

print(f"# mlflow {mlflow.__version__}")
print("# flask")
for rule in sorted(flask_app.url_map.iter_rules(), key=lambda r: r.rule):
    methods = ",".join(sorted(m for m in rule.methods if m not in ("HEAD", "OPTIONS")))
    print(f"{methods}\t{rule.rule}\t{rule.endpoint}")

print("# fastapi (matched before the flask mount at /)")


def walk(routes, prefix=""):
    for route in routes:
        if hasattr(route, "original_router"):  # fastapi's include_router(), newer releases
            walk(route.original_router.routes, prefix + (route.include_context.prefix or ""))
            continue
        sub = getattr(route, "routes", None)
        path = getattr(route, "path", "") or ""
        if sub and not getattr(route, "methods", None):
            walk(sub, prefix + path)
        elif getattr(route, "methods", None):
            print(f"{','.join(sorted(route.methods))}\t{prefix + path}\t{getattr(route, 'name', '')}")
        else:
            print(f"*\t{prefix + path or '/'}\t{type(route).__name__}")


walk(fastapi_app.routes)
