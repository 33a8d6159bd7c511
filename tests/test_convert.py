"""convert import-hf / export-hf and the checkpoint reader (tiny random transformers models, fp32, CPU)."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import launch
from conftest import make_word_tokenizer
from jaxllava.config import load_config
from jaxllava import checkpoint
from jaxllava.convert import hf
from jaxllava.checkpoint import load_checkpoint_params, model_from_params, write_params_checkpoint
from jaxllava.convert.hf import export_lm, import_hf
from jaxllava.convert.reference import VISION_PREFIX
from jaxllava.errors import ConfigError, ConversionError
from conftest import randomize_torch_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.yaml")
TOKENS = 38  # conftest's word tokenizer: 4 specials + 31 words + 3 image placeholders
BASE_TOKENS = 35
LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=30.0, rms_norm_eps=1e-5, max_position_embeddings=64,
             tie_word_embeddings=False)
# configs/tiny.yaml's tower input is 32 px with 8-px patches; this DINOv2 was trained on 32 px too.
DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=8, image_size=32, mlp_ratio=2)


randomize = randomize_torch_model


def save_llama(directory, vocab_size=TOKENS, seed=0, **save_kwargs) -> str:
    model = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab_size, **LLAMA)), seed)
    model.save_pretrained(str(directory), **save_kwargs)
    return str(directory)


def save_dinov2(directory, seed=1) -> str:
    randomize(transformers.Dinov2Model(transformers.Dinov2Config(**DINOV2)), seed).save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"lm": save_llama(root / "lm"), "vision": save_dinov2(root / "vision"),
            "tokenizer": make_word_tokenizer(str(root / "tokenizer")), "root": root}


@pytest.fixture(scope="module")
def imported(sources):
    out = str(sources["root"] / "imported")
    code = launch.main(["convert", "import-hf", "--lm", sources["lm"], "--vision", sources["vision"],
                        "--tokenizer", sources["tokenizer"], "--config", TINY_CONFIG, "--out", out])
    assert code == 0
    return out


def text_config():
    return load_config(TINY_CONFIG, ["model.vision=null"])


# ----------------------------------------------------------------------------- round trips


def test_import_then_export_gives_bit_identical_llama_and_dinov2_tensors(sources, imported, tmp_path):
    assert launch.main(["convert", "export-hf", "--checkpoint", imported, "--out", str(tmp_path / "lm")]) == 0
    original_lm = load_file(os.path.join(sources["lm"], "model.safetensors"))
    exported_lm = load_file(str(tmp_path / "lm" / "model.safetensors"))
    assert sorted(exported_lm) == sorted(original_lm)
    for name, array in original_lm.items():
        assert exported_lm[name].dtype == array.dtype, name
        np.testing.assert_array_equal(exported_lm[name], array, err_msg=name)

    # the BabyLM pipeline pins transformers 4.51, which cannot read transformers 5's tokenizer_config fields
    with open(tmp_path / "lm" / "tokenizer_config.json") as f:
        tokenizer_config = json.load(f)
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not {"extra_special_tokens", "backend", "is_local"} & set(tokenizer_config)
    assert set(tokenizer_config["additional_special_tokens"]) >= {"<im_start>", "<im_patch>", "<im_end>"}

    assert launch.main(["convert", "export-hf", "--checkpoint", imported, "--out", str(tmp_path / "full"),
                        "--what", "reference"]) == 0
    exported = load_file(str(tmp_path / "full" / "model.safetensors"))
    tower = {k[len(VISION_PREFIX):]: v for k, v in exported.items() if k.startswith(VISION_PREFIX)}
    original_tower = load_file(os.path.join(sources["vision"], "model.safetensors"))
    del original_tower["embeddings.mask_token"]  # pre-training only; reported unused on import
    assert sorted(tower) == sorted(original_tower)
    for name, array in original_tower.items():
        assert tower[name].dtype == array.dtype, name
        np.testing.assert_array_equal(tower[name], array, err_msg=name)


def test_import_report_names_mapped_unused_and_initialised_parts(imported, sources):
    with open(os.path.join(imported, checkpoint.REPORT_JSON)) as f:
        report = json.load(f)
    assert len(report["lm"]["mapped"]) == len(load_file(os.path.join(sources["lm"], "model.safetensors")))
    assert list(report["vision"]["unused"]) == ["embeddings.mask_token"]
    assert set(report["initialised"]) == {"projector"}  # identity resampler: nothing to initialise
    config, params, run = load_checkpoint_params(imported)
    assert config.model.lm.vocab_size == TOKENS and config.model.lm.hidden_size == LLAMA["hidden_size"]
    assert any("model.lm.hidden_size" in note for note in report["notes"])  # tiny.yaml said 64
    # the checkpoint's own copy: a step directory is usable wherever it is moved
    assert config.data.tokenizer == os.path.join(imported, "checkpoints", "0", "assets", "tokenizer")
    assert sorted(os.listdir(config.data.tokenizer)) == sorted(os.listdir(os.path.join(imported, "tokenizer")))
    assert run["conversion"]["imported_from"]["lm"] == os.path.abspath(sources["lm"])


def test_exported_lm_logits_match_jaxllava_on_padded_batch(imported, tmp_path):
    export_lm(imported, str(tmp_path / "lm"))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm")).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "lm"))
    assert len(tokenizer) == TOKENS

    lengths = [11, 6, 1]
    rng = np.random.RandomState(0)
    ids = rng.randint(4, TOKENS, (len(lengths), 11)).astype(np.int32)
    real = np.arange(11)[None] < np.asarray(lengths)[:, None]
    ids = np.where(real, ids, 0)
    config, params, _ = load_checkpoint_params(imported)
    model = model_from_params(dataclass_float32(config.model), params)
    graphdef, state = nnx.split(model)
    ours = jax.jit(lambda s, i, seg, pos: nnx.merge(graphdef, s)(i, segment_ids=seg, positions=pos))(
        state, jnp.asarray(ids), jnp.asarray(real.astype(np.int32)),
        jnp.asarray(np.where(real, np.arange(11)[None], 0)))
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.from_numpy(ids).long(),
                             attention_mask=torch.from_numpy(real.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=1e-5, rtol=0)


def dataclass_float32(model_config):
    import dataclasses

    return dataclasses.replace(model_config, dtype="float32", attention_impl="xla")


# ----------------------------------------------------------------------------- vocabulary growth and formats


def test_new_tokenizer_rows_get_the_mean_of_existing_rows_in_embedding_and_head(sources, tmp_path):
    lm = save_llama(tmp_path / "lm35", vocab_size=BASE_TOKENS)  # the tokenizer's placeholders 35..37 are new
    report = import_hf(text_config(), str(tmp_path / "out"), lm, tokenizer_dir=sources["tokenizer"])
    config, params, _ = load_checkpoint_params(str(tmp_path / "out"))
    assert config.model.lm.vocab_size == TOKENS
    assert report["meta"]["model.lm"]["new_tokens"] == ["<im_start>", "<im_patch>", "<im_end>"]
    original = load_file(os.path.join(lm, "model.safetensors"))
    for name, grown in (("model.embed_tokens.weight", params["lm"]["embed_tokens"]["embedding"]),
                        ("lm_head.weight", params["lm"]["lm_head"]["kernel"].T)):
        old = original[name]
        np.testing.assert_array_equal(grown[:BASE_TOKENS], old)
        for row in grown[BASE_TOKENS:]:
            np.testing.assert_allclose(row, old.astype(np.float64).mean(axis=0), rtol=0, atol=1e-7)
    assert checkpoint.read_meta(str(tmp_path / "out"))["model.lm"]["vocab_size"] == {"checkpoint": BASE_TOKENS,
                                                                                   "now": TOKENS}


def test_sharded_bfloat16_and_torch_bin_checkpoints_import_exactly(sources, tmp_path):
    model = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=TOKENS, **LLAMA)), 0)
    model = model.to(torch.bfloat16)
    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    import_hf(text_config(), str(tmp_path / "a"), sharded, tokenizer_dir=sources["tokenizer"])
    _, from_safetensors, _ = load_checkpoint_params(str(tmp_path / "a"))
    weights = {k: v.float().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(from_safetensors["lm"]["embed_tokens"]["embedding"],
                                  weights["model.embed_tokens.weight"])
    np.testing.assert_array_equal(from_safetensors["lm"]["layers"][1]["mlp"]["down_proj"]["kernel"],
                                  weights["model.layers.1.mlp.down_proj.weight"].T)

    bin_dir = tmp_path / "bin"  # transformers 5 no longer writes .bin files: torch.save by hand
    os.makedirs(bin_dir)
    shutil.copy(os.path.join(sharded, "config.json"), bin_dir)
    torch.save(model.state_dict(), str(bin_dir / "pytorch_model.bin"))
    import_hf(text_config(), str(tmp_path / "b"), str(bin_dir), tokenizer_dir=sources["tokenizer"])
    _, from_bin, _ = load_checkpoint_params(str(tmp_path / "b"))
    jax.tree.map(np.testing.assert_array_equal, from_bin, from_safetensors)


def import_hf_once(sources, out):
    import_hf(text_config(), str(out), sources["lm"], tokenizer_dir=sources["tokenizer"])
    return out


# ----------------------------------------------------------------------------- checkpoint locations


def test_load_accepts_workdir_step_directory_and_milestone_entries(imported, tmp_path):
    work = str(tmp_path / "run")
    shutil.copytree(imported, work, symlinks=True)
    os.makedirs(os.path.join(work, "milestones"))
    os.symlink(os.path.join(os.pardir, "checkpoints", "0"), os.path.join(work, "milestones", "chck_10M"))
    with open(os.path.join(work, "milestones", "chck_20M.json"), "w") as f:
        json.dump({"checkpoint": os.path.join("checkpoints", "0")}, f)  # a filesystem without links
    _, expected, _ = load_checkpoint_params(work)
    for path in (os.path.join(work, "checkpoints", "0"), os.path.join(work, "milestones", "chck_10M"),
                 os.path.join(work, "milestones", "chck_20M")):
        config, params, _ = load_checkpoint_params(path)
        assert config.data.tokenizer == os.path.join(os.path.realpath(work), "checkpoints", "0", "assets",
                                                     "tokenizer")
        jax.tree.map(np.testing.assert_array_equal, params, expected)
    with pytest.raises(ConversionError, match="no such checkpoint"):
        load_checkpoint_params(os.path.join(work, "milestones", "chck_30M"))


def test_training_checkpoint_params_are_read_without_optimizer_state(imported, tmp_path):
    """The training loop's layout (params as an nnx.State, optimizer state beside them) reads back too,
    here placed with explicit shardings."""
    from jaxllava.config import config_to_dict
    from jaxllava.checkpoint import Checkpointer
    from jaxllava.train.config import CheckpointConfig

    config, params, _ = load_checkpoint_params(imported)
    state = nnx.state(model_from_params(config.model, params), nnx.Param)
    trained = jax.tree.map(lambda x: jnp.asarray(x) + 1.0, state)
    checkpointer = Checkpointer(str(tmp_path / "run"), CheckpointConfig(async_save=False))
    checkpointer.save(7, {"params": trained, "opt_state": {"mu": trained}, "step": jnp.int32(7)},
                      meta={"words_seen": 1}, data_state={}, run_record={"config": config_to_dict(config)})
    checkpointer.close()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, restored, _ = load_checkpoint_params(str(tmp_path / "run"), shardings=jax.tree.map(lambda _: device, params))
    assert isinstance(restored["lm"]["norm"]["scale"], jax.Array)
    jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), want + 1.0), restored, params)


def test_stored_params_that_disagree_with_the_stored_config_are_refused(sources, tmp_path):
    config = text_config()
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), checkpoint.abstract_params(config.model))
    params["lm"]["norm"]["scale"] = np.ones((7,), np.float32)
    write_params_checkpoint(str(tmp_path / "bad"), config, params, sources["tokenizer"], {})
    with pytest.raises(ConversionError, match=r"'lm/norm/scale' has shape \(7,\).*expects \(64,\)"):
        load_checkpoint_params(str(tmp_path / "bad"))


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def lm_tensors(sources):
    return load_file(os.path.join(sources["lm"], "model.safetensors"))


def lm_dir_with(directory, sources, tensors) -> str:
    os.makedirs(directory)
    shutil.copy(os.path.join(sources["lm"], "config.json"), directory)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def import_text(sources, lm_dir, out):
    return import_hf(text_config(), str(out), lm_dir, tokenizer_dir=sources["tokenizer"])


def test_missing_weights_file_is_named(sources, tmp_path):
    os.makedirs(tmp_path / "empty")
    shutil.copy(os.path.join(sources["lm"], "config.json"), tmp_path / "empty")
    with pytest.raises(ConversionError, match="empty: no model.safetensors"):
        import_text(sources, str(tmp_path / "empty"), tmp_path / "out")
    sharded = tmp_path / "sharded"
    save_llama(sharded, max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))[0]
    os.remove(sharded / shard)
    with pytest.raises(ConversionError, match=f"{shard}: file holding tensor 'model.embed_tokens.weight' is missing"):
        import_text(sources, str(sharded), tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_shape_mismatch_names_tensor_and_both_shapes(sources, lm_tensors, tmp_path):
    bad = dict(lm_tensors, **{"model.layers.1.mlp.up_proj.weight": np.zeros((40, 32), np.float32)})
    with pytest.raises(ConversionError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight': checkpoint shape "
                                              r"\(40, 32\), model expects \(48, 32\)"):
        import_text(sources, lm_dir_with(tmp_path / "lm", sources, bad), tmp_path / "out")


def test_non_float_tensor_is_a_dtype_error(sources, lm_tensors, tmp_path):
    bad = dict(lm_tensors, **{"model.norm.weight": np.ones((32,), np.int32)})
    with pytest.raises(ConversionError, match=r"'model\.norm\.weight' \(shape \(32,\)\) has dtype int32"):
        import_text(sources, lm_dir_with(tmp_path / "lm", sources, bad), tmp_path / "out")


def test_unexpected_and_missing_tensors_are_named(sources, lm_tensors, tmp_path):
    extra = dict(lm_tensors, **{"model.layers.0.mlp.extra_proj.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ConversionError, match=r"1 unexpected tensor\(s\).*'model\.layers\.0\.mlp\.extra_proj"):
        import_text(sources, lm_dir_with(tmp_path / "extra", sources, extra), tmp_path / "out")
    missing = {k: v for k, v in lm_tensors.items() if k != "model.norm.weight"}
    with pytest.raises(ConversionError, match=r"'model\.norm\.weight' \(shape \(32,\)\) is missing"):
        import_text(sources, lm_dir_with(tmp_path / "missing", sources, missing), tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_vocabulary_that_disagrees_with_the_tokenizer_is_refused(sources, imported, tmp_path):
    small = save_llama(tmp_path / "lm20", vocab_size=20)  # the tokenizer's base words go up to id 34
    with pytest.raises(ConversionError, match=r"38 tokens but the LM's embedding has 20 rows.*ids \[20, 21"):
        import_text(sources, small, tmp_path / "out")
    swapped = str(tmp_path / "swapped")
    shutil.copytree(imported, swapped)
    tokenizer = os.path.join(swapped, "checkpoints", "0", "assets", "tokenizer")  # what an export reads
    shutil.rmtree(tokenizer)
    make_word_tokenizer(tokenizer, extra_words=("zebra", "yak"))
    with pytest.raises(ConfigError, match=r"40 tokens \(image placeholders included\) but model.lm.vocab_size is 38"):
        export_lm(swapped, str(tmp_path / "export"))
    assert not os.path.exists(tmp_path / "export")


def test_config_with_a_tower_needs_a_vision_checkpoint(sources, tmp_path):
    with pytest.raises(ConversionError, match="no --vision directory"):
        import_hf(load_config(TINY_CONFIG), str(tmp_path / "out"), sources["lm"], tokenizer_dir=sources["tokenizer"])


def test_interrupted_conversion_leaves_no_partial_output(sources, imported, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    # after the Orbax checkpoint is written, before the run record: the temp directory is half full
    monkeypatch.setattr("jaxllava.provenance.write_run_json", fail)
    with pytest.raises(KeyboardInterrupt):
        import_hf_once(sources, tmp_path / "out")
    # after model.safetensors is written, before the tokenizer
    monkeypatch.setattr(hf, "save_export_tokenizer", fail)
    with pytest.raises(KeyboardInterrupt):
        export_lm(imported, str(tmp_path / "export"))
    assert os.listdir(tmp_path) == []


def test_existing_output_is_never_overwritten(sources, imported):
    before = sorted(os.listdir(imported))
    with pytest.raises(ConversionError, match="already exists; refusing to overwrite"):
        import_hf_once(sources, imported)
    assert sorted(os.listdir(imported)) == before


def test_sharded_export_writes_an_index_that_reads_back_identically(tmp_path):
    from jaxllava.convert.checkpoint_files import CheckpointTensors, save_sharded_safetensors

    rng = np.random.default_rng(0)
    tensors = {f"layer.{i}.weight": rng.standard_normal((8, 16)).astype(np.float32) for i in range(5)}
    names = save_sharded_safetensors(iter(tensors.items()), str(tmp_path), max_shard_bytes=2 * 8 * 16 * 4)
    assert sorted(names) == sorted(tensors)
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-00003.safetensors"))) == 3
    read = CheckpointTensors(str(tmp_path))
    for name, array in tensors.items():
        np.testing.assert_array_equal(read[name], array)


def test_key_map_walker_applies_renames_list_indices_flattening_and_layouts():
    from jaxllava.model.hf_keys import LINEAR, SAME, Layout, hf_entries
    from jaxllava.model.layers import Dense, LayerNorm

    leading_axis = Layout(lambda a: a[0], lambda a: a[None])

    class Block(nnx.Module):
        HF_RENAMES = {"proj": "dense"}

        def __init__(self, rngs):
            self.proj = Dense(2, 3, axes=(None, None), rngs=rngs)
            self.norm = LayerNorm(3, eps=1e-5)

    class Tower(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Block(rngs), Block(rngs)])
            self.head = Dense(3, 4, axes=(None, None), use_bias=False, rngs=rngs)
            self.token = nnx.Param(jnp.zeros((3,)))

        def hf_renames(self):
            # the outer declaration wins over Block's own "proj" rename for the second block
            return {"blocks": "encoder.layer", "blocks.1.proj": "second", "head": "", "token": "embeddings.cls"}

        def hf_layouts(self):
            return {"token": leading_axis}

    tower = Tower(nnx.Rngs(0))
    entries = {e.name: e for e in hf_entries(tower)}
    assert sorted(entries) == sorted([
        "encoder.layer.0.dense.weight", "encoder.layer.0.dense.bias", "encoder.layer.0.norm.weight",
        "encoder.layer.0.norm.bias", "second.weight", "second.bias", "encoder.layer.1.norm.weight",
        "encoder.layer.1.norm.bias", "weight", "embeddings.cls"])
    assert entries["weight"].layout is LINEAR and entries["second.weight"].layout is LINEAR
    assert entries["encoder.layer.0.norm.weight"].layout is SAME
    assert entries["embeddings.cls"].layout is leading_axis
    assert entries["second.bias"].param is tower.blocks[1].proj.bias  # the module's own Variable, for loading
    assert leading_axis.hf_shape((3,)) == (1, 3)
