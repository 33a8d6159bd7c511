"""What trained this model: `run.json` with config, code version, packages, devices and data.

Every run writes this record to its work directory and every checkpoint carries
a copy, so which code and settings trained a model is never lost (README pitfall 33).
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from typing import Any, Iterable, Optional

from jaxllava.data.records import fingerprint_files

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "tokenizers",
            "numpy", "tensorboardX")
UNKNOWN = "unknown"
RUN_JSON = "run.json"


def _git(args: list[str], cwd: str) -> Optional[bytes]:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def code_version(repo_dir: Optional[str] = None) -> dict[str, Any]:
    """Git commit, dirty flag and sha256 of `git diff HEAD` (tracked changes) of the code.

    Outside a git checkout (an installed wheel, a copied tree) every field is "unknown".
    """
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _git(["rev-parse", "HEAD"], repo_dir)
    if commit is None:
        return {"commit": UNKNOWN, "dirty": UNKNOWN, "diff_sha256": UNKNOWN, "untracked_files": UNKNOWN}
    diff = _git(["diff", "HEAD", "--binary"], repo_dir) or b""
    untracked = (_git(["ls-files", "--others", "--exclude-standard"], repo_dir) or b"").decode().split()
    return {
        "commit": commit.decode().strip(),
        "dirty": bool(diff) or bool(untracked),
        "diff_sha256": hashlib.sha256(diff).hexdigest(),
        "untracked_files": sorted(untracked),
    }


def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def data_fingerprint(paths: Iterable[str], counts: dict[str, int], sha256: Optional[str] = None) -> dict[str, Any]:
    """The record files' hash (pass `sha256` when the data pipeline computed it already) and
    the caller's counts per modality (e.g. {'text': 900, 'image': 100})."""
    paths = list(paths)
    return {"files": paths, "sha256": sha256 or fingerprint_files(paths), "counts": dict(counts)}


def device_record(mesh=None) -> dict[str, Any]:
    import jax

    devices = jax.devices()
    record = {
        "backend": jax.default_backend(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "device_kinds": sorted({d.device_kind for d in devices}),
    }
    if mesh is not None:
        record["mesh"] = {str(name): int(size) for name, size in mesh.shape.items()}
    return record


def run_record(config, mesh=None, data_fingerprint: Optional[dict] = None) -> dict[str, Any]:
    """The provenance record of a run (JSON-serialisable)."""
    from jaxllava.config import config_to_dict

    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "config": config_to_dict(config),
        "code": code_version(),
        "packages": package_versions(),
        "devices": device_record(mesh),
        "data": data_fingerprint,
    }


def write_run_json(workdir: str, record: dict) -> str:
    """Write `<workdir>/run.json` atomically; returns its path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RUN_JSON)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path
