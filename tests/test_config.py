"""The config loader: YAML + bases + overrides into the typed schema, and its error messages."""
from __future__ import annotations

import dataclasses
import os
import re
import textwrap

import pytest
import yaml

from jaxllava import config as config_module
from jaxllava.config import ExperimentConfig, build_config, config_to_dict, dump_yaml, load_config
from jaxllava.data.config import SourceConfig
from jaxllava.errors import ConfigError
from jaxllava.model.config import VisionConfig


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path / "c.yaml", "")) == ExperimentConfig()


def test_dump_then_load_round_trips_a_nontrivial_config(tmp_path):
    config = load_config(write(tmp_path / "c.yaml", """
        model:
          vision: {kind: clip, image_size: 336}
          lm: {num_layers: 2, rope_scaling: {factor: 4.0}}
        data:
          sources: [{path: a.jsonl, weight: 2}, {path: b.json}]
          buckets: [64, 128]
        optim: {parts: {projector: {lr: 1e-3}, vision: {train: true}}, schedule: linear, grad_clip: null}
        eval: {tasks: {blimp: data/blimp}, protocol: "2024"}
    """))
    again = load_config(write(tmp_path / "dumped.yaml", dump_yaml(config)))
    assert again == config
    assert config.model.vision == VisionConfig(kind="clip", image_size=336)
    # paths resolve against the config file's folder, like base:
    assert config.data.sources == (SourceConfig(str(tmp_path / "a.jsonl"), 2.0), SourceConfig(str(tmp_path / "b.json")))
    assert config.data.buckets == (64, 128)
    assert config.optim.grad_clip is None
    assert config.optim.part_lr("projector") == 1e-3 and config.optim.part_trainable("vision")
    assert config.eval.tasks == {"blimp": str(tmp_path / "data" / "blimp")}


def test_paths_resolve_against_the_file_that_sets_them_and_set_paths_against_the_working_directory(
        tmp_path, monkeypatch):
    (tmp_path / "configs" / "presets").mkdir(parents=True)
    write(tmp_path / "configs" / "presets" / "data.yaml", """
        data: {tokenizer: ../../tok, sources: [{path: ../../records.jsonl, image_folder: images}]}
        train: {init_from: ../../imported}
    """)
    path = write(tmp_path / "configs" / "run.yaml", """
        base: presets/data.yaml
        data: {image: {preprocessor_config: pre.json}}
        eval: {tasks: {pairs: ../pairs.jsonl}}
        train: {workdir: runs/x}
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory plays no part for paths set in files
    config = load_config(path)
    assert config.data.tokenizer == str(tmp_path / "tok")
    assert config.data.sources[0].path == str(tmp_path / "records.jsonl")
    assert config.data.sources[0].image_folder == str(tmp_path / "configs" / "presets" / "images")
    assert config.train.init_from == str(tmp_path / "imported")
    assert config.data.image.preprocessor_config == str(tmp_path / "configs" / "pre.json")
    assert config.eval.tasks == {"pairs": str(tmp_path / "pairs.jsonl")}
    assert config.train.workdir == "runs/x"  # an output location: relative to where the run is started
    overridden = load_config(path, ["data.tokenizer=mine", "data.sources=[{path: local.jsonl}]"])
    assert overridden.data.tokenizer == str(elsewhere / "mine")
    assert overridden.data.sources[0].path == str(elsewhere / "local.jsonl")
    assert load_config(write(tmp_path / "again.yaml", dump_yaml(config))) == config  # absolute from now on


def test_config_to_dict_is_plain_yaml_safe_data():
    plain = config_to_dict(ExperimentConfig())
    assert isinstance(plain["data"]["buckets"], list)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain


def test_exponent_without_dot_is_read_as_a_float(tmp_path):
    # PyYAML reads `5e-4` as a string (YAML 1.1); a float field accepts it.
    config = load_config(write(tmp_path / "c.yaml", "optim: {lr: 5e-4}\n"))
    assert config.optim.lr == pytest.approx(5e-4) and isinstance(config.optim.lr, float)


def test_overrides_set_nested_values_with_yaml_parsing(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {lr: 0.1}\n")
    config = load_config(path, ["optim.lr=1e-4", "data.buckets=[32, 64]", "train.word_budget=100",
                                "model.vision.image_size=112", "optim.schedule=constant"])
    assert config.optim.lr == pytest.approx(1e-4)
    assert config.data.buckets == (32, 64)
    assert config.train.word_budget == 100
    assert config.model.vision == VisionConfig(image_size=112)
    assert config.optim.schedule == "constant"


def test_override_to_null_clears_an_optional_section(tmp_path):
    path = write(tmp_path / "c.yaml", "model: {vision: {kind: siglip}}\n")
    assert load_config(path, ["model.vision=null"]).model.vision is None


def test_bases_merge_in_order_then_the_file_wins(tmp_path):
    write(tmp_path / "presets" / "model.yaml", """
        model: {lm: {num_layers: 4, hidden_size: 96}, dtype: float32}
    """)
    write(tmp_path / "presets" / "small_lm.yaml", """
        model: {lm: {num_layers: 2}}
        optim: {lr: 0.01}
    """)
    path = write(tmp_path / "exp.yaml", """
        base: [presets/model.yaml, presets/small_lm.yaml]
        optim: {warmup_steps: 5}
    """)
    config = load_config(path)
    assert config.model.lm.num_layers == 2  # the later base wins
    assert config.model.lm.hidden_size == 96  # merged, not replaced
    assert config.model.dtype == "float32"
    assert config.optim.lr == 0.01 and config.optim.warmup_steps == 5


def test_base_may_itself_have_a_base(tmp_path):
    write(tmp_path / "a.yaml", "train: {seed: 7, log_every: 3}\n")
    write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\ntrain: {seed: 8}\n")
    config = load_config(write(tmp_path / "c.yaml", "base: sub/b.yaml\n"))
    assert (config.train.seed, config.train.log_every) == (8, 3)


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


def test_missing_base_names_the_including_file(tmp_path):
    path = write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: config file not found \(a base of .*c\.yaml\)"):
        load_config(path)


def test_misspelt_key_names_file_and_suggests_nearest(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {wieght_decay: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: unknown key 'optim.wieght_decay'; did you mean 'optim.weight_decay'?"


def test_misspelt_key_in_a_base_names_the_base_file(tmp_path):
    base = write(tmp_path / "presets" / "m.yaml", "model: {lm: {num_layer: 2}}\n")
    path = write(tmp_path / "c.yaml", "base: presets/m.yaml\n")
    with pytest.raises(ConfigError, match=f"{base}: unknown key 'model.lm.num_layer'; did you mean "
                                          "'model.lm.num_layers'"):
        load_config(path)


def test_unknown_section_lists_the_valid_keys_when_nothing_is_close(tmp_path):
    path = write(tmp_path / "c.yaml", "zzz: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'zzz'; valid keys here: model, data, optim"):
        load_config(path)


def test_unknown_key_inside_a_list_of_sources_is_reported_with_its_index(tmp_path):
    path = write(tmp_path / "c.yaml", "data: {sources: [{path: a}, {path: b, wieght: 2}]}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data\.sources\.1\.wieght'; did you mean "
                                          r"'data\.sources\.1\.weight'"):
        load_config(path)


def test_misspelt_override_key_names_the_override(tmp_path):
    path = write(tmp_path / "c.yaml", "")
    with pytest.raises(ConfigError, match=r"--set train\.word_budjet=5: unknown key 'train\.word_budjet'; "
                                          r"did you mean 'train\.word_budget'"):
        load_config(path, ["train.word_budjet=5"])


def test_override_without_equals_sign_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(write(tmp_path / "c.yaml", ""), ["optim.lr"])


def test_wrong_type_names_key_expected_and_given(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {grad_accum: four}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: 'train.grad_accum': expected int, got str 'four'"


def test_bool_is_not_accepted_for_an_int():
    with pytest.raises(ConfigError, match="'train.seed': expected int, got bool True"):
        build_config({"train": {"seed": True}})


def test_optional_type_error_mentions_null(tmp_path):
    path = write(tmp_path / "c.yaml", "")
    with pytest.raises(ConfigError, match=r"--set optim.grad_clip=big: 'optim.grad_clip': expected float or null, "
                                          r"got str 'big'"):
        load_config(path, ["optim.grad_clip=big"])


def test_literal_violation_lists_the_allowed_values(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {schedule: cosine_with_restarts}\n")
    with pytest.raises(ConfigError, match=r"'optim.schedule': expected one of 'cosine', 'linear', 'constant', "
                                          r"got str 'cosine_with_restarts'"):
        load_config(path)


def test_optional_field_accepts_null_and_rejects_other_types():
    assert build_config({"optim": {"warmup_steps": None}}).optim.warmup_steps is None
    with pytest.raises(ConfigError, match=r"'optim.warmup_steps': expected int or null"):
        build_config({"optim": {"warmup_steps": "ten"}})


def test_literal_protocol_rejects_unknown_versions():
    with pytest.raises(ConfigError, match="expected one of '2025', '2024'"):
        build_config({"eval": {"protocol": "2023"}})


def test_fixed_length_tuple_checks_its_length():
    with pytest.raises(ConfigError, match=r"'data.image.mean': expected list of 3 .* \(needs exactly 3 items\)"):
        build_config({"data": {"image": {"mean": [0.5, 0.5]}}})


def test_wrong_element_type_in_a_list_names_the_element():
    with pytest.raises(ConfigError, match=r"'data.buckets.1': expected int, got str 'x'"):
        build_config({"data": {"buckets": [128, "x"]}})


def test_section_given_as_scalar_is_a_type_error():
    with pytest.raises(ConfigError, match="'optim': expected OptimConfig, got int 3"):
        build_config({"optim": 3})


def test_cross_field_rule_is_reported_with_its_section(tmp_path):
    path = write(tmp_path / "c.yaml", "mesh: {data: -1, fsdp: -1}\n")
    with pytest.raises(ConfigError, match=f"{path}: 'mesh': mesh axes must be >= 1 with at most one -1"):
        load_config(path)


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match="'data.sources.0.path' is required"):
        build_config({"data": {"sources": [{"weight": 1.0}]}})


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{path}: invalid YAML"):
        load_config(path)


def test_a_mapping_field_is_replaced_not_merged(tmp_path):
    write(tmp_path / "base.yaml", "eval: {tasks: {a: a.jsonl, b: b.jsonl}, batch_size: 8}\n")
    path = write(tmp_path / "c.yaml", "base: base.yaml\neval: {tasks: {c: c.jsonl}}\n")
    config = load_config(path)
    assert config.eval.tasks == {"c": str(tmp_path / "c.jsonl")} and config.eval.batch_size == 8  # sections still merge
    assert load_config(path, ["eval.tasks={}"]).eval.tasks == {}



# ----------------------------------------------------------------------------- value rules
#
# Every rule is exercised through the loader on the shipped tiny config, as a user
# would hit it: one line naming the dotted key (and the override that set it).

TINY = "configs/tiny.yaml"

BAD_VALUES = [
    # data
    (["data.text_rows=-8"], "data.text_rows", "must be >= 1, got -8"),
    (["data.text_rows=0"], "data.text_rows", ">= 1"),
    (["data.image_rows=-8"], "data.image_rows", ">= 1"),
    (["data.buckets=[1]"], "data.buckets", "cannot hold a token and its target"),
    (["data.buckets=[-32, 64]"], "data.buckets", ">= 2"),
    (["data.buckets=[0, 64]"], "data.buckets", ">= 2"),
    (["data.buckets=[]"], "data.buckets", "at least one"),
    (["data.buckets=[64, 32]"], "data.buckets", "strictly increasing.*got \\[64, 32\\]"),
    (["data.buckets=[32, 32]"], "data.buckets", "strictly increasing"),
    (["data.epochs=0"], "data.epochs", ">= 1"),
    (["data.num_workers=-1"], "data.num_workers", ">= 0"),
    (["data.prefetch=0"], "data.prefetch", ">= 1"),
    (["data.sources=[{path: a.jsonl, weight: -1}]"], "data.sources.0.weight", "> 0, got -1"),
    (["data.sources=[{path: a.jsonl}, {path: b.jsonl, weight: 0}]"], "data.sources.1.weight", "> 0"),
    (["data.sources=[{path: a.jsonl, weight: .nan}]"], "data.sources.0.weight", "got nan"),
    (["data.sources=[{path: ''}]"], "data.sources.0.path", "empty"),
    (["data.chat_template=llama_3"], "data.chat_template", "one of llama_2, vicuna_v1, got 'llama_3'"),
    (["data.image.std=[0.5, 0, 0.5]"], "data.image.std", "> 0"),
    (["data.image.mean=[.nan, 0.5, 0.5]"], "data.image.mean", "finite"),
    (["data.image.max_pixels=0"], "data.image.max_pixels", ">= 1"),
    # model.lm
    (["model.lm.hidden_size=-1"], "model.lm.hidden_size", ">= 1, got -1"),
    (["model.lm.num_heads=0"], "model.lm.num_heads", ">= 1"),
    (["model.lm.vocab_size=0"], "model.lm.vocab_size", ">= 1"),
    (["model.lm.intermediate_size=0"], "model.lm.intermediate_size", ">= 1"),
    (["model.lm.num_layers=0"], "model.lm.num_layers", ">= 1"),
    (["model.lm.num_kv_heads=3"], "model.lm.num_kv_heads", "divide num_heads \\(4\\).*got 3"),
    (["model.lm.hidden_size=66"], "model.lm.hidden_size", "multiple of num_heads \\(4\\)"),
    (["model.lm.head_dim=0"], "model.lm.head_dim", ">= 1 or null"),
    (["model.lm.head_dim=7"], "model.lm.head_dim", "odd head_dim 7"),
    (["model.lm.rms_norm_eps=0"], "model.lm.rms_norm_eps", "> 0"),
    (["model.lm.rope_theta=-1"], "model.lm.rope_theta", "> 0"),
    (["model.lm.max_position_embeddings=0"], "model.lm.max_position_embeddings", ">= 1"),
    (["model.lm.rope_scaling={factor: 0}"], "model.lm.rope_scaling.factor", "> 0"),
    (["model.lm.rope_scaling={low_freq_factor: 4, high_freq_factor: 4}"], "model.lm.rope_scaling.high_freq_factor",
     "> low_freq_factor"),
    # model.vision
    (["model.vision.patch_size=0"], "model.vision.patch_size", ">= 1"),
    (["model.vision.image_size=4"], "model.vision.image_size", "at least one patch \\(patch_size 8 px\\), got 4"),
    (["model.vision.pretrained_image_size=4"], "model.vision.pretrained_image_size", "at least one patch"),
    (["model.vision.hidden_size=0"], "model.vision.hidden_size", ">= 1"),
    (["model.vision.intermediate_size=0"], "model.vision.intermediate_size", ">= 1"),
    (["model.vision.num_layers=0"], "model.vision.num_layers", ">= 1"),
    (["model.vision.num_heads=3"], "model.vision.num_heads", "divide hidden_size \\(64\\)"),
    (["model.vision.feature_layer=3"], "model.vision.feature_layer", "\\[-3, 2\\] for a 2-layer tower, got 3"),
    (["model.vision.feature_layer=-4"], "model.vision.feature_layer", "\\[-3, 2\\]"),
    (["model.vision.layer_norm_eps=0"], "model.vision.layer_norm_eps", "> 0"),
    # model.resampler and model.projector
    (["model.resampler.pool_stride=0"], "model.resampler.pool_stride", ">= 1"),
    (["model.resampler.num_latents=0"], "model.resampler.num_latents", ">= 1"),
    (["model.resampler.depth=0"], "model.resampler.depth", ">= 1"),
    (["model.resampler.num_heads=0"], "model.resampler.num_heads", ">= 1"),
    (["model.resampler.ff_mult=0"], "model.resampler.ff_mult", ">= 1"),
    (["model.resampler.layer_norm_eps=-1"], "model.resampler.layer_norm_eps", "> 0"),
    (["model.projector.kind=mlp0x_gelu"], "model.projector.kind", "'linear' or 'mlp\\{k\\}x_gelu'"),
    (["model.projector.kind=mlp2x_relu"], "model.projector.kind", "got 'mlp2x_relu'"),
    (["model.projector.kind=linear2"], "model.projector.kind", "got 'linear2'"),
    # model: rules across the tower and the resampler (the tiny tower: 4×4 grid, width 64)
    (["model.resampler.kind=token_packer", "model.resampler.num_latents=32", "model.resampler.num_heads=4"],
     "model.resampler.num_latents", "square number .*got 32"),
    (["model.resampler.kind=token_packer", "model.resampler.num_latents=25", "model.resampler.num_heads=4"],
     "model.resampler.num_latents", "5×5 queries \\(25\\) exceed the 4×4 vision grid"),
    (["model.resampler.kind=avg_pool", "model.resampler.pool_stride=5"], "model.resampler.pool_stride",
     "\\[1, 4\\], got 5"),
    (["model.resampler.kind=perceiver", "model.resampler.num_heads=3"], "model.resampler.num_heads",
     "divide vision.hidden_size \\(64\\), got 3"),
    (["model.resampler.kind=token_packer", "model.resampler.num_latents=16", "model.resampler.num_heads=3"],
     "model.resampler.num_heads", "divide"),
    # optim
    (["optim.lr=-1"], "optim.lr", ">= 0"),
    (["optim.lr=.nan"], "optim.lr", "finite"),
    (["optim.parts.lm.lr=-1"], "optim.parts.lm.lr", ">= 0"),
    (["optim.parts.vision.lr=.inf"], "optim.parts.vision.lr", "finite"),
    (["optim.b1=1.0"], "optim.b1", "\\[0, 1\\)"),
    (["optim.b2=-0.1"], "optim.b2", "\\[0, 1\\)"),
    (["optim.eps=0"], "optim.eps", "> 0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay", ">= 0"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps", ">= 0"),
    (["optim.warmup_ratio=1.5"], "optim.warmup_ratio", "\\[0, 1\\]"),
    (["optim.min_lr_ratio=-0.1"], "optim.min_lr_ratio", "\\[0, 1\\]"),
    (["optim.grad_clip=0"], "optim.grad_clip", "> 0 or null"),
    # train, mesh, checkpoint, logging
    (["train.steps=0"], "train.steps", ">= 1 or null"),
    (["train.grad_accum=0"], "train.grad_accum", ">= 1"),
    (["train.word_budget=0"], "train.word_budget", ">= 1 or null"),
    (["train.log_every=0"], "train.log_every", ">= 1"),
    (["train.workdir=''"], "train.workdir", "empty"),
    (["train.init_from=''"], "train.init_from", "empty"),
    (["mesh.num_processes=0"], "mesh.num_processes", ">= 1 or null"),
    (["mesh.process_id=-1"], "mesh.process_id", ">= 0 or null"),
    (["mesh.num_processes=2", "mesh.process_id=2"], "mesh.process_id", "below num_processes \\(2\\)"),
    (["mesh.coordinator_address=''"], "mesh.coordinator_address", "empty"),
    (["checkpoint.every_steps=-1"], "checkpoint.every_steps", ">= 0"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last", ">= 1"),
    (["checkpoint.save_concurrent_gb=0"], "checkpoint.save_concurrent_gb", ">= 1"),
    (["checkpoint.milestone_words=[0, 10]"], "checkpoint.milestone_words", ">= 1"),
    (["logging.profile_steps=[0, 2]"], "logging.profile_steps", "1 <= first <= last"),
    (["logging.profile_steps=[3, 2]"], "logging.profile_steps", "1 <= first <= last"),
    # eval: a task name is a directory under the workdir
    (["eval.batch_size=0"], "eval.batch_size", ">= 1"),
    (["eval.every_steps=-1"], "eval.every_steps", ">= 0"),
    (["eval.tasks={/tmp/x: a.jsonl}"], "eval.tasks", "got '/tmp/x'"),
    (["eval.tasks={../../x: a.jsonl}"], "eval.tasks", "got '../../x'"),
    (["eval.tasks={a/b: a.jsonl}"], "eval.tasks", "got 'a/b'"),
    (['eval.tasks={"a\\\\b": a.jsonl}'], "eval.tasks", "got 'a\\\\\\\\b'"),
    (["eval.tasks={'..': a.jsonl}"], "eval.tasks", "got '..'"),
    (["eval.tasks={'.': a.jsonl}"], "eval.tasks", "got '.'"),
    (["eval.tasks={'a b': a.jsonl}"], "eval.tasks", "got 'a b'"),
    (["eval.tasks={blimp: ''}"], "eval.tasks", "'blimp' must name a file"),
    (["eval.image_templates=['<image> {text} end']"], "eval.image_templates.0", "followed by \\{text\\}"),
    (["eval.image_templates=['ok {text}', '{image} {text}']"], "eval.image_templates.1", "literal text"),
    # across sections
    (["data.buckets=[32, 512]"], "data.buckets", "512 tokens but model.lm.max_position_embeddings is 256"),
    (["model.lm.max_position_embeddings=48"], "data.buckets", "64 tokens .* is 48"),
]


@pytest.mark.parametrize("overrides, key, detail", BAD_VALUES, ids=[" ".join(o) for o, _, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_override_and_the_dotted_key(overrides, key, detail):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert f"'{key}': " in message, message
    assert message.startswith("--set ") or message.startswith(TINY), message
    assert re.search(detail, message), message


GOOD_VALUES = [
    ["data.buckets=[2, 256]"], ["data.num_workers=0", "data.seed=-5", "data.prefetch=1"],
    ["data.chat_template=vicuna_v1"], ["data.sources=[{path: a.jsonl, weight: 0.5}]"],
    ["model.lm.num_kv_heads=1"], ["model.lm.head_dim=8"], ["model.lm.max_position_embeddings=64"],
    ["model.lm.rope_scaling={factor: 8.0}"],
    ["model.vision.feature_layer=-3"], ["model.vision.feature_layer=2"],
    ["model.vision.image_size=8", "model.vision.pretrained_image_size=8"],
    ["model.resampler.kind=token_packer", "model.resampler.num_latents=16", "model.resampler.num_heads=4"],
    ["model.resampler.kind=avg_pool", "model.resampler.pool_stride=4"],
    ["model.resampler.kind=perceiver", "model.resampler.num_heads=64"],
    # A text-only model builds no resampler, so the tower rules do not apply.
    ["model.vision=null", "model.resampler.kind=token_packer", "model.resampler.num_latents=32"],
    ["model.projector.kind=linear"], ["model.projector.kind=mlp10x_gelu"],
    ["optim.lr=0", "optim.parts.projector.lr=0", "optim.b1=0", "optim.warmup_ratio=1"],
    ["mesh.num_processes=2", "mesh.process_id=1"],
    ["eval.tasks={blimp_2.0-filtered: a.jsonl}"], ["eval.image_templates=['<image>\\n{text}']"],
]


@pytest.mark.parametrize("overrides", GOOD_VALUES, ids=[" ".join(o) for o in GOOD_VALUES])
def test_values_at_the_edge_of_each_rule_are_accepted(overrides):
    load_config(TINY, overrides)


def test_the_error_names_the_override_that_set_the_bad_key_not_the_file_of_its_section():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["data.text_rows=-8"])
    assert str(info.value) == "--set data.text_rows=-8: 'data.text_rows': must be >= 1, got -8"


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "data: {buckets: [64, 32]}\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}: 'data.buckets': must be strictly increasing"):
        load_config(path)


def test_a_section_built_in_code_is_checked_too():
    # dataclasses.replace runs __post_init__, so a config changed in code cannot skip the rules.
    config = load_config(TINY)
    with pytest.raises(ConfigError, match="'text_rows': must be >= 1"):
        dataclasses.replace(config.data, text_rows=0)
    with pytest.raises(ConfigError, match="'data.buckets': go up to 64 tokens"):
        dataclasses.replace(config, model=dataclasses.replace(
            config.model, lm=dataclasses.replace(config.model.lm, max_position_embeddings=32)))


# ----------------------------------------------------------------------------- reading files


def test_config_path_that_is_a_directory_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path))}: is a directory, not a config file$"):
        load_config(tmp_path)


def test_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"optim: {lr: 0.1}\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: not UTF-8 text"):
        load_config(path)


def test_unreadable_config_file_is_named(tmp_path, monkeypatch):
    path = write(tmp_path / "c.yaml", "")

    def refuse(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", file)

    # Tests may run as root, for whom file modes deny nothing, so the refusal is simulated.
    monkeypatch.setattr(config_module, "open", refuse, raising=False)
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}: cannot read the config file: Permission denied$"):
        load_config(path)


def test_a_base_that_is_a_directory_names_the_including_file(tmp_path):
    (tmp_path / "presets").mkdir()
    path = write(tmp_path / "c.yaml", "base: presets\n")
    with pytest.raises(ConfigError, match=r"presets: is a directory, not a config file \(a base of .*c\.yaml\)"):
        load_config(path)


# ----------------------------------------------------------------------------- optim.parts


def test_setting_only_the_vision_lr_leaves_the_tower_frozen():
    optim = load_config(TINY, ["optim.parts.vision.lr=1e-4"]).optim
    assert optim.part_lr("vision") == pytest.approx(1e-4)
    assert not optim.part_trainable("vision")
    assert all(optim.part_trainable(p) for p in ("lm", "projector", "resampler"))


def test_part_keys_merge_one_by_one_across_files_and_overrides(tmp_path):
    path = write(tmp_path / "c.yaml", f"""
        base: {os.path.abspath(TINY)}
        optim: {{parts: {{vision: {{lr: 1e-4}}, lm: {{train: false}}}}}}
    """)
    optim = load_config(path, ["optim.parts.vision.train=true"]).optim
    assert optim.part_trainable("vision") and optim.part_lr("vision") == pytest.approx(1e-4)
    assert not optim.part_trainable("lm") and optim.part_lr("lm") == optim.lr == pytest.approx(3e-3)


@pytest.mark.parametrize("part", ["lm", "projector", "resampler", "vision"])
@pytest.mark.parametrize("old, new, value", [("{part}_lr", "lr", "1e-4"), ("train_{part}", "train", "true")])
def test_the_old_flat_part_keys_name_their_new_place(part, old, new, value):
    old = old.format(part=part)
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [f"optim.{old}={value}"])
    assert str(info.value) == (f"--set optim.{old}={value}: unknown key 'optim.{old}'; "
                               f"it is now 'optim.parts.{part}.{new}'")


def test_an_unknown_part_is_an_unknown_key():
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.parts\.decoder'; valid keys here: lm, projector, "
                                          r"resampler, vision"):
        load_config(TINY, ["optim.parts.decoder.train=true"])
