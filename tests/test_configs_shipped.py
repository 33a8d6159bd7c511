"""Every config shipped in configs/ loads, validates and describes a buildable model."""
from __future__ import annotations

import glob

import pytest
from flax import nnx

from jaxllava.config import load_config
from jaxllava.model.llava import LlavaModel

EXPERIMENTS = sorted(glob.glob("configs/*.yaml"))
PRESETS = sorted(glob.glob("configs/presets/*/*.yaml"))


def test_the_shipped_configs_are_the_documented_ones():
    assert {"configs/tiny.yaml", "configs/babylm_reference.yaml", "configs/llama_1b_multigpu.yaml",
            "configs/babylm_2025_multimodal.yaml", "configs/tiny_features.yaml",
            "configs/tiny_video.yaml"} <= set(EXPERIMENTS)


def test_babylm_2025_config_reads_the_files_as_distributed():
    config = load_config("configs/babylm_2025_multimodal.yaml")
    text, narratives, cc3m = config.data.sources
    assert text.format == "text" and text.path.endswith("data/babylm_2025/train_50M/*.train")
    assert narratives.format == cc3m.format == "captions"
    assert [p.rsplit("/", 1)[-1] for p in cc3m.features] == ["cc_3M_dino_v2_states_1of2.npy",
                                                             "cc_3M_dino_v2_states_2of2.npy"]
    assert config.model.vision.kind == "features" and config.model.vision.hidden_size == 768
    assert config.model.image_tokens == config.model.projector.expand  # one vector, expanded


@pytest.mark.parametrize("path", EXPERIMENTS + PRESETS)
def test_config_loads_validates_and_its_model_can_be_built(path):
    # Every rule, across sections too, is checked on loading. Presets are fragments whose data
    # section is the default one, with buckets up to 2048: short ones fit every preset's LM.
    config = load_config(path, [] if path in EXPERIMENTS else ["data.buckets=[32]"])
    # Shapes only (no memory): the model the config describes is consistent.
    model = nnx.eval_shape(lambda: LlavaModel(config.model, rngs=nnx.Rngs(0)))
    has_tower = config.model.vision is not None and config.model.vision.kind != "features"
    assert (model.vision is not None) == has_tower
    assert (model.projector is None) == (config.model.vision is None)


def test_babylm_reference_config_states_the_reference_run():
    config = load_config("configs/babylm_reference.yaml")
    assert config.model.lm.num_layers == 12 and config.model.lm.hidden_size == 768
    assert config.model.vision.kind == "dinov2" and config.model.vision.hidden_size == 1024
    assert not config.optim.part_trainable("vision") and config.model.image_tokens == 256
    assert config.model.resampler.kind == "identity" and config.model.projector.kind == "mlp2x_gelu"
    assert (config.optim.lr, config.optim.weight_decay, config.optim.warmup_ratio, config.optim.schedule) == (
        5e-4, 0.0, 0.1, "cosine")
    assert config.data.text_rows * config.train.grad_accum == 64 and not config.data.pack_text
    assert config.data.objective == "plain_lm" and config.train.word_budget == 100_000_000
    assert config.checkpoint.milestones
