"""Projectors against torch nn.Linear / nn.Sequential(Linear, GELU(), Linear, ...) loaded from LLaVA-named tensors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from jaxllava.convert.checkpoint_files import CheckpointTensors
from jaxllava.convert.weights import hf_state_dict, load_projector_weights
from jaxllava.errors import ConfigError, ConversionError
from jaxllava.model.config import ProjectorConfig
from jaxllava.model.layers import gelu_tanh
from jaxllava.model.projectors import Projector

ATOL = 1e-5
PREFIX = "model.mm_projector."


def torch_projector(kind: str, depth: int, seed: int) -> torch.nn.Module:
    """LLaVA's builder: a bare Linear for `linear`, else Sequential(Linear, GELU(), Linear, ...)."""
    torch.manual_seed(seed)
    if kind == "linear":
        return torch.nn.Linear(24, 16)
    modules = [torch.nn.Linear(24, 16)]
    for _ in range(depth - 1):
        modules += [torch.nn.GELU(), torch.nn.Linear(16, 16)]
    return torch.nn.Sequential(*modules)


def save_with_prefix(module: torch.nn.Module, directory) -> CheckpointTensors:
    tensors = {PREFIX + k: v.detach().numpy() for k, v in module.state_dict().items()}
    tensors["model.embed_tokens.weight"] = np.zeros((4, 16), np.float32)  # the rest of a LLaVA checkpoint
    save_file(tensors, str(directory / "model.safetensors"))
    return CheckpointTensors(str(directory))


def inputs(seed: int = 0) -> np.ndarray:
    return (3.0 * np.random.RandomState(seed).randn(2, 5, 24)).astype(np.float32)


@pytest.mark.parametrize("kind,depth,names", [
    ("linear", 1, ["weight", "bias"]),
    ("mlp2x_gelu", 2, ["0.weight", "0.bias", "2.weight", "2.bias"]),
    ("mlp3x_gelu", 3, ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]),
])
def test_projector_matches_torch_with_llava_weight_names(kind, depth, names, tmp_path):
    reference = torch_projector(kind, depth, seed=depth)
    tensors = save_with_prefix(reference, tmp_path)
    projector = Projector(ProjectorConfig(kind), 24, 16, rngs=nnx.Rngs(0))
    assert len(projector.layers) == depth
    assert load_projector_weights(projector, tensors) == []
    assert sorted(hf_state_dict(projector, prefix=PREFIX)) == sorted(PREFIX + n for n in names)
    x = inputs()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    out = projector(jnp.asarray(x))
    assert out.shape == (2, 5, 16)
    assert float(np.abs(np.asarray(out) - expected).max()) <= ATOL


def test_mlp_gelu_is_the_exact_erf_form_not_the_tanh_approximation(tmp_path):
    reference = torch_projector("mlp2x_gelu", 2, seed=5)
    projector = Projector(ProjectorConfig("mlp2x_gelu"), 24, 16, rngs=nnx.Rngs(0))
    load_projector_weights(projector, save_with_prefix(reference, tmp_path))
    x = jnp.asarray(inputs(1))
    first, second = projector.layers
    tanh_form = second(gelu_tanh(first(x)))
    assert float(jnp.abs(projector(x) - tanh_form).max()) > 1e-4  # the parity test above would see a tanh GELU


def test_state_dict_round_trip_is_bit_exact():
    projector = Projector(ProjectorConfig("mlp2x_gelu"), 24, 16, rngs=nnx.Rngs(1))
    exported = hf_state_dict(projector, prefix="mm_projector.")
    fresh = nnx.eval_shape(lambda: Projector(ProjectorConfig("mlp2x_gelu"), 24, 16, rngs=nnx.Rngs(2)))
    assert load_projector_weights(fresh, exported, prefix="mm_projector.") == []
    again = hf_state_dict(fresh, prefix="mm_projector.")
    for name in exported:
        np.testing.assert_array_equal(exported[name], again[name])


def test_loading_errors_name_the_tensor_and_both_shapes():
    projector = Projector(ProjectorConfig("mlp2x_gelu"), 24, 16, rngs=nnx.Rngs(1))
    tensors = hf_state_dict(projector, prefix=PREFIX)
    missing = dict(tensors)
    del missing[PREFIX + "2.bias"]
    with pytest.raises(ConversionError, match=r"model\.mm_projector\.2\.bias.*missing"):
        load_projector_weights(projector, missing)
    wrong = dict(tensors, **{PREFIX + "0.weight": np.zeros((16, 23), np.float32)})
    with pytest.raises(ConversionError, match=r"0\.weight.*\(16, 23\).*\(16, 24\)"):
        load_projector_weights(projector, wrong)


def test_projector_parameters_carry_logical_axes():
    projector = Projector(ProjectorConfig("mlp3x_gelu"), 24, 16, rngs=nnx.Rngs(0))
    for variable in jax.tree.leaves(nnx.state(projector, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
        axes = variable.get_metadata().get("axes")
        assert axes is not None and len(axes) == variable.ndim


@pytest.mark.parametrize("kind,depth", [("linear", 1), ("mlp2x_gelu", 2)])
def test_expand_makes_k_consecutive_tokens_per_input_token_like_torch(kind, depth, tmp_path):
    """expand k: the last torch Linear outputs k·D and (B, n, k·D) is viewed as (B, n·k, D), so output
    token i·k + m is the m-th D-slice of input token i (input-token-major)."""
    k = 4
    torch.manual_seed(depth)
    if kind == "linear":
        reference = torch.nn.Linear(24, 16 * k)
    else:
        reference = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.GELU(), torch.nn.Linear(16, 16 * k))
    projector = Projector(ProjectorConfig(kind, expand=k), 24, 16, rngs=nnx.Rngs(0))
    assert projector.layers[-1].kernel.shape == (24 if depth == 1 else 16, 16 * k)
    assert load_projector_weights(projector, save_with_prefix(reference, tmp_path)) == []
    x = inputs(2)
    with torch.no_grad():
        wide = reference(torch.from_numpy(x)).numpy()  # (2, 5, k·16)
    out = np.asarray(projector(jnp.asarray(x)))
    assert out.shape == (2, 5 * k, 16)
    np.testing.assert_allclose(out, wide.reshape(2, 5 * k, 16), rtol=0, atol=ATOL)
    np.testing.assert_allclose(out[:, 1 * k + 2], wide[:, 1, 2 * 16:3 * 16], rtol=0, atol=ATOL)


def test_expand_must_be_at_least_one():
    with pytest.raises(ConfigError, match="expand"):
        ProjectorConfig("mlp2x_gelu", expand=0)
