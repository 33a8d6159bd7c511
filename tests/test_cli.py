"""launch.py: every expected failure is one `error:` line with exit code 2 (tracebacks behind --debug),
every subcommand's -h describes its arguments, and a run stopped by a signal exits 128 + signal."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def run_main(capsys, *argv: str) -> tuple[int, str]:
    code = launch.main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override", [
    "data.image_rows=0", "data.buckets=[]", "data.sources=[{path: data/sample/text.jsonl, weight: .nan}]",
    "data.chat_template=llama_9", "model.vision.patch_size=0", "model.resampler={kind: avg_pool, pool_stride: 0}",
    "model.resampler={kind: token_packer, num_latents: 5, num_heads: 4}", "model.lm.hidden_size=-1",
    "model.lm.num_heads=0", "model.lm.num_kv_heads=3", "data.prefetch=-1", "data.text_rows=-8",
    "eval.tasks={../../x: data/sample/minimal_pairs.jsonl}",
])
def test_bad_config_values_are_one_error_line_with_exit_code_2(capsys, override):
    code, err = run_main(capsys, "inspect-data", "--config", TINY, "--set", override, "--batches", "1")
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert override.split("=")[0].split(".")[0] in err  # the section of the bad key is named


def test_a_mesh_larger_than_the_machine_is_one_error_line(capsys, tmp_path):
    code, err = run_main(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "run"), "--set", "mesh.data=4")
    assert code == 2 and err.startswith("error: mesh") and "4 devices" in err and err.count("\n") == 1, err


def test_a_directory_as_config_is_one_error_line(capsys):
    code, err = run_main(capsys, "inspect-data", "--config", os.path.join(ROOT, "configs"))
    assert code == 2 and err.startswith("error: ") and "configs" in err and err.count("\n") == 1, err


def test_debug_shows_the_traceback_of_an_input_error(capsys):
    from jaxllava.errors import ConfigError

    with pytest.raises(ConfigError, match="image_rows"):
        launch.main(["inspect-data", "--config", TINY, "--set", "data.image_rows=0", "--debug"])


class _Malicious:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_blocked_malicious_torch_file_is_one_error_line(capsys, tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text('{"model_type": "llama", "vocab_size": 8, "hidden_size": 8, '
                                    '"intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}')
    with open(lm / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Malicious()}, f)
    code, err = run_main(capsys, "convert", "import-hf", "--lm", str(lm), "--config", TINY,
                         "--set", "model.vision=null", "--out", str(tmp_path / "out"))
    assert code == 2 and err.startswith("error: ") and "pytorch_model.bin" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, expected", [
    (["train"], ["--config", "--set", "--workdir"]),
    (["inspect-data"], ["--config", "--batches"]),
    (["eval"], ["--checkpoint", "--task", "--image-template", "--protocol", "--batch-size", "--dtype", "--out"]),
    (["convert", "import-hf"], ["--lm", "--vision", "--tokenizer", "--config", "--out"]),
    (["convert", "import-reference"], ["--dir", "--out", "--vision-config", "--image-size", "--drop-lape"]),
    (["convert", "export-hf"], ["--checkpoint", "--out", "--what"]),
])
def test_every_subcommand_help_describes_its_arguments(capsys, command, expected):
    with pytest.raises(SystemExit) as exit_info:
        launch.main(command + ["-h"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in expected:
        line = next((line for line in out.splitlines() if line.strip().startswith(option)), None)
        assert line is not None, (option, out)
    assert "rest" not in out.split()


def test_sigterm_exits_143_after_saving(tmp_path):
    """A job script must tell a preempted run (saved, resumable) from a finished one."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), "train", "--config", TINY,
                             "--workdir", str(workdir), "--set", "logging.tensorboard=false", "--set", "eval.tasks={}",
                             "--set", "checkpoint.every_steps=0", "--set", "train.log_every=1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.2)  # the first metrics row is written after step 1
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by signal SIGTERM" in out
    assert [name for name in os.listdir(workdir / "checkpoints") if name.isdigit()]


def test_cache_images_is_a_subcommand_that_prints_how_to_train_from_the_cache(capsys, tmp_path):
    code = launch.main(["cache-images", "--config", TINY, "--out", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert code == 0, out
    # configs/tiny.yaml's image records: 400 captions and 400 questions (qa.json) about the same files.
    assert "cached 800 images" in out and "--set 'data.sources=[" in out
    assert (tmp_path / "cache" / "cache.json").exists()
    code, err = run_main(capsys, "cache-images", "--config", TINY, "--out", str(tmp_path / "cache"))
    assert code == 2 and "exists" in err and err.count("\n") == 1, err  # never overwritten
