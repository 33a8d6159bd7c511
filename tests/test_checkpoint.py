"""Orbax checkpoints: full train-state round trip, retention, milestones, safety, resharding."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllava.errors import TrainingError
from jaxllava.model.layers import Dense, RMSNorm
from jaxllava.checkpoint import Checkpointer, write_diagnostics
from jaxllava.train.config import CheckpointConfig, OptimConfig
from jaxllava.train.optimizer import make_optimizer


class Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lm = Dense(4, 6, axes=("embed", "mlp"), rngs=rngs)
        self.projector = RMSNorm(4, eps=1e-5)
        self.vision = Dense(3, 4, axes=(None, None), rngs=rngs)  # frozen: no optimizer state


def abstract_like(tree):
    """ShapeDtypeStructs of `tree`'s arrays, each carrying the array's own sharding (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def train_state(seed: int = 0):
    """params + AdamW state after one update + RNG key data: what the loop checkpoints."""
    params = nnx.split(Toy(nnx.Rngs(seed)), nnx.Param, ...)[1]
    tx, _ = make_optimizer(OptimConfig(warmup_steps=0), params, 10)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    return {"params": params, "opt_state": opt_state, "rng": jax.random.key_data(jax.random.key(seed + 7))}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save(ckpt: Checkpointer, step: int, state=None, milestones=(), words=0):
    ckpt.save(step, state if state is not None else train_state(), meta={"words_seen": words},
              data_state={"epoch": 0, "position": step}, run_record={"config": {"seed": 0}}, milestones=milestones)


CFG = CheckpointConfig(keep_last=2, async_save=True)


def test_no_checkpoint_restores_none(tmp_path):
    ckpt = Checkpointer(str(tmp_path), CFG)
    assert ckpt.restore_latest(abstract_like(train_state())) is None
    ckpt.close()


def test_round_trip_restores_params_optimizer_rng_meta_data_and_run_record(tmp_path):
    state = train_state(seed=3)
    ckpt = Checkpointer(str(tmp_path), CFG)
    ckpt.save(12, state, meta={"words_seen": 4321, "milestones_done": [1000]},
              data_state={"epoch": 1, "position": 17}, run_record={"code": {"commit": "abc"}})
    ckpt.close()

    restored = Checkpointer(str(tmp_path), CFG).restore_latest(abstract_like(train_state(seed=0)))
    assert restored.step == 12
    assert_trees_equal(restored.state, state)
    assert restored.meta == {"words_seen": 4321, "milestones_done": [1000], "step": 12, "milestones": []}
    assert restored.data_state == {"epoch": 1, "position": 17}
    assert restored.run == {"code": {"commit": "abc"}}
    assert os.path.exists(tmp_path / "checkpoints" / "12" / "data" / "process_0-of-1.json")


def test_async_save_snapshots_metadata_at_save_time(tmp_path):
    ckpt = Checkpointer(str(tmp_path), CFG)
    meta, data_state = {"words_seen": 10}, {"position": 1}
    ckpt.save(1, train_state(), meta=meta, data_state=data_state, run_record={})
    meta["words_seen"], data_state["position"] = 99, 99  # the loop moves on while the save runs
    ckpt.close()
    restored = Checkpointer(str(tmp_path), CFG).restore_latest(abstract_like(train_state()))
    assert restored.meta["words_seen"] == 10 and restored.data_state == {"position": 1}


def test_keeps_last_k_regular_and_every_milestone_checkpoint(tmp_path):
    ckpt = Checkpointer(str(tmp_path), CFG)
    state = train_state()
    for step in range(1, 8):
        save(ckpt, step, state, milestones=[1_000_000] if step == 2 else [], words=step * 600_000)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 6, 7]
    entry = json.loads((tmp_path / "milestones" / "chck_1M.json").read_text())
    assert entry == {"milestone": 1_000_000, "name": "chck_1M", "words_seen": 1_200_000, "step": 2,
                     "checkpoint": "checkpoints/2"}
    assert os.path.realpath(tmp_path / "milestones" / "chck_1M") == str(tmp_path / "checkpoints" / "2")
    ckpt.close()


def test_milestones_survive_reopening_and_the_index_is_rebuilt_from_checkpoints(tmp_path):
    ckpt = Checkpointer(str(tmp_path), CFG)
    state = train_state()
    save(ckpt, 1, state, milestones=[1_000_000, 2_000_000], words=2_000_000)
    ckpt.close()
    for name in os.listdir(tmp_path / "milestones"):  # as if the run died before writing its index
        os.remove(tmp_path / "milestones" / name)

    reopened = Checkpointer(str(tmp_path), CFG)
    assert sorted(os.listdir(tmp_path / "milestones")) == ["chck_1M", "chck_1M.json", "chck_2M", "chck_2M.json"]
    for step in range(2, 6):
        save(reopened, step, state)
    reopened.close()
    assert reopened.all_steps() == [1, 4, 5]  # step 1 is a milestone from the earlier session


def test_existing_step_is_never_overwritten(tmp_path):
    ckpt = Checkpointer(str(tmp_path), CFG)
    good = train_state(seed=1)
    save(ckpt, 5, good)
    ckpt.wait()
    with pytest.raises(TrainingError, match="step 5 already exists; refusing to overwrite"):
        save(ckpt, 5, train_state(seed=2))
    ckpt.close()
    assert_trees_equal(Checkpointer(str(tmp_path), CFG).restore_latest(abstract_like(good)).state, good)


def test_interrupted_and_foreign_directories_are_not_restored(tmp_path):
    ckpt = Checkpointer(str(tmp_path), CFG)
    state = train_state()
    save(ckpt, 3, state)
    ckpt.close()
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "4.orbax-checkpoint-tmp-1700000000").mkdir()  # a save cut short
    (checkpoints / "4.orbax-checkpoint-tmp-1700000000" / "state").mkdir()
    (checkpoints / "9").mkdir()  # a hand-made directory with no commit metadata
    reopened = Checkpointer(str(tmp_path), CFG)
    assert reopened.complete_steps() == [3]
    assert reopened.restore_latest(abstract_like(state)).step == 3
    reopened.close()


def test_diagnostics_go_outside_the_checkpoints(tmp_path):
    path = write_diagnostics(str(tmp_path), 17, {"error": "loss is nan"}, {"input_ids": np.ones((2, 3), np.int32)})
    assert path == str(tmp_path / "diagnostics" / "step_17")
    assert json.loads(open(os.path.join(path, "info.json")).read()) == {"error": "loss is nan"}
    np.testing.assert_array_equal(np.load(os.path.join(path, "arrays.npz"))["input_ids"], np.ones((2, 3)))
    assert not (tmp_path / "checkpoints").exists()


RESHARD_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxllava.model.sharding import make_mesh
    from jaxllava.checkpoint import Checkpointer

    def abstract_like(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    from jaxllava.train.config import CheckpointConfig

    workdir = sys.argv[1]
    assert jax.device_count() == 8
    value = np.arange(64.0, dtype=np.float32).reshape(8, 8)
    saved_mesh = make_mesh(data=8)
    state = {"w": jax.device_put(value, NamedSharding(saved_mesh, P("data", None)))}
    ckpt = Checkpointer(workdir, CheckpointConfig())
    ckpt.save(1, state, meta={}, data_state={}, run_record={})
    ckpt.close()

    target_mesh = make_mesh(data=1, fsdp=4, tensor=2)
    target = {"w": NamedSharding(target_mesh, P("fsdp", "tensor"))}
    restored = Checkpointer(workdir, CheckpointConfig()).restore_latest(abstract_like(state, target)).state["w"]
    np.testing.assert_array_equal(np.asarray(restored), value)
    assert restored.sharding == target["w"], restored.sharding
    assert restored.addressable_shards[0].data.shape == (2, 4)

    one = {"w": NamedSharding(make_mesh(devices=jax.devices()[:1]), P())}
    single = Checkpointer(workdir, CheckpointConfig()).restore_latest(abstract_like(state, one)).state["w"]
    assert single.sharding == one["w"] and single.addressable_shards[0].data.shape == (8, 8)
    print("RESHARD_OK")
""")


def test_restore_onto_a_different_mesh_uses_the_target_shardings(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", RESHARD_SCRIPT, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert "RESHARD_OK" in result.stdout, result.stderr[-3000:]
