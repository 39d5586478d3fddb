#!/usr/bin/env python3
"""Reads ci/matrix.yaml.  ``matrix.py run PLATFORM [--no-setup] [--suite NAME]`` runs a
leg here; ``matrix.py workflow`` prints the GitHub Actions workflow generated from it;
``matrix.py list`` names the legs."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATRIX = ROOT / "ci" / "matrix.yaml"


def load() -> dict:
    try:
        import yaml
    except ImportError:  # a fresh runner: PyYAML comes with the [test] extra, but we read first
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "pyyaml"])
        import yaml
    return yaml.safe_load(MATRIX.read_text())["platforms"]


def workflow(platforms: dict) -> str:
    import yaml

    jobs = {}
    for name, leg in platforms.items():
        steps = [{"uses": "actions/checkout@v4"}]
        if "ubuntu-latest" in leg["runs-on"]:
            steps.append({"uses": "actions/setup-python@v5", "with": {"python-version": "3.11"}})
        steps.append({"name": "setup", "run": "\n".join(leg["setup"]) + "\n"})
        for s in leg["suites"]:
            steps.append({"name": s["name"], "run": s["run"]})
        runs_on = leg["runs-on"]
        jobs[name] = {
            "name": f"{name} (--device {leg['device']})",
            "runs-on": runs_on[0] if len(runs_on) == 1 else runs_on,
            "timeout-minutes": 120,
            "env": {"PIP_DISABLE_PIP_VERSION_CHECK": "1", **{k: str(v) for k, v in leg["env"].items()}},
            "steps": steps,
        }
    doc = {"name": "ci", "on": {"push": {"branches": ["main"]}, "pull_request": None,
                                "workflow_dispatch": None},
           "jobs": jobs}
    header = "# GENERATED from ci/matrix.yaml by `python3 ci/matrix.py workflow`; do not edit by hand.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


def run(platforms: dict, name: str, setup: bool, only: str | None) -> int:
    if name not in platforms:
        print(f"unknown platform {name!r}; legs: {', '.join(platforms)}", file=sys.stderr)
        return 2
    leg = platforms[name]
    env = {**os.environ, **{k: str(v) for k, v in leg["env"].items()}}
    cmds = (leg["setup"] if setup else []) + [s["run"] for s in leg["suites"] if only in (None, s["name"])]
    for cmd in cmds:
        print(f"+ [{name}] {cmd}", flush=True)
        rc = subprocess.call(cmd, shell=True, cwd=ROOT, env=env)
        if rc:
            return rc
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("platform")
    r.add_argument("--no-setup", action="store_true")
    r.add_argument("--suite")
    sub.add_parser("workflow")
    sub.add_parser("list")
    ns = ap.parse_args(argv)
    platforms = load()
    if ns.cmd == "workflow":
        sys.stdout.write(workflow(platforms))
        return 0
    if ns.cmd == "list":
        for n, leg in platforms.items():
            print(f"{n:<11} {' '.join(leg['runs-on']):<36} --device {leg['device']:<5} {leg['description']}")
        return 0
    return run(platforms, ns.platform, not ns.no_setup, ns.suite)


if __name__ == "__main__":
    sys.exit(main())
