"""run.json: config, code version (git or unknown), packages, devices, data fingerprint."""
from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from jaxllava.config import build_config, config_to_dict
from jaxllava.model.sharding import make_mesh
from jaxllava.provenance import (code_version, data_fingerprint, fingerprint_files, package_versions,
                                       run_record, write_run_json)


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(cwd), "PATH": "/usr/bin:/bin"})


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_clean_checkout_reports_commit_and_not_dirty(repo):
    version = code_version(str(repo))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert version["commit"] == head
    assert version["dirty"] is False
    assert version["diff_sha256"] == hashlib.sha256(b"").hexdigest()


def test_modified_checkout_is_dirty_and_diff_hash_tracks_the_change(repo):
    (repo / "a.py").write_text("x = 2\n")
    first = code_version(str(repo))
    (repo / "a.py").write_text("x = 3\n")
    second = code_version(str(repo))
    assert first["dirty"] is True and second["dirty"] is True
    assert first["diff_sha256"] != second["diff_sha256"]
    assert first["diff_sha256"] != hashlib.sha256(b"").hexdigest()


def test_untracked_file_makes_the_checkout_dirty(repo):
    (repo / "new.py").write_text("y = 1\n")
    version = code_version(str(repo))
    assert version["dirty"] is True and version["untracked_files"] == ["new.py"]


def test_outside_git_every_code_field_is_unknown(tmp_path):
    assert set(code_version(str(tmp_path)).values()) == {"unknown"}


def test_package_versions_include_the_stack():
    versions = package_versions()
    import jax
    import optax
    assert versions["jax"] == jax.__version__
    assert versions["optax"] == optax.__version__
    assert "orbax-checkpoint" in versions and "python" in versions


def test_fingerprint_changes_with_content_and_order(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"id": 1}\n')
    b.write_text('{"id": 2}\n')
    base = fingerprint_files([str(a), str(b)])
    assert fingerprint_files([str(a), str(b)]) == base
    assert fingerprint_files([str(b), str(a)]) != base
    b.write_text('{"id": 3}\n')
    assert fingerprint_files([str(a), str(b)]) != base


def test_run_record_is_json_with_config_devices_mesh_and_data(tmp_path):
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("{}\n")
    config = build_config({"optim": {"lr": 0.01}})
    record = run_record(config, make_mesh(data=1), data_fingerprint([str(data_file)], {"text": 3, "image": 1}))
    path = write_run_json(str(tmp_path / "run"), record)
    loaded = json.loads(open(path).read())
    assert loaded["config"] == config_to_dict(config)
    assert build_config(loaded["config"]) == config
    assert loaded["devices"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert loaded["devices"]["backend"] == "cpu"
    assert loaded["data"]["counts"] == {"text": 3, "image": 1}
    assert loaded["data"]["sha256"] == fingerprint_files([str(data_file)])
    assert set(loaded["code"]) == {"commit", "dirty", "diff_sha256", "untracked_files"}
    assert loaded["packages"]["flax"]
