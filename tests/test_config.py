"""The config loader: YAML + bases + overrides into the typed schema, and its error messages."""
from __future__ import annotations

import textwrap

import pytest
import yaml

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
        optim: {projector_lr: 1e-3, schedule: linear, grad_clip: null}
        eval: {tasks: {blimp: data/blimp}, image_templates: ["<image> {text}"], protocol: "2024"}
    """))
    again = load_config(write(tmp_path / "dumped.yaml", dump_yaml(config)))
    assert again == config
    assert config.model.vision == VisionConfig(kind="clip", image_size=336)
    assert config.data.sources == (SourceConfig("a.jsonl", 2.0), SourceConfig("b.json"))
    assert config.data.buckets == (64, 128)
    assert config.optim.grad_clip is None
    assert config.eval.tasks == {"blimp": "data/blimp"}


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
        model: {lm: {num_layers: 4, hidden_size: 64}, dtype: float32}
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
    assert config.model.lm.hidden_size == 64  # merged, not replaced
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
    assert config.eval.tasks == {"c": "c.jsonl"} and config.eval.batch_size == 8  # sections still merge
    assert load_config(path, ["eval.tasks={}"]).eval.tasks == {}
