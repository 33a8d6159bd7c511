"""Resamplers: output counts agree with ModelConfig.image_tokens; perceiver and windowed TokenPacker vs torch."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from jaxllava.model.config import ModelConfig, ResamplerConfig, VisionConfig
from jaxllava.model.resamplers import make_resampler

ATOL = 1e-5
# A 224 px / 14 px tower: the reference's 16×16 patch grid, in a tiny width.
VISION = VisionConfig(kind="dinov2", image_size=224, patch_size=14, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4)
KINDS = [ResamplerConfig("identity"), ResamplerConfig("perceiver", num_latents=9, depth=2, num_heads=4),
         ResamplerConfig("token_packer", num_latents=16, num_heads=4), ResamplerConfig("avg_pool", pool_stride=3)]


def features(vision: VisionConfig, batch: int = 2, seed: int = 0) -> np.ndarray:
    shape = (batch, vision.output_tokens, vision.hidden_size)
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def perturb(module, seed: int):
    """Add noise to every parameter: LayerNorms leave (1, 0) and biases leave 0, so each one matters."""
    rng = np.random.RandomState(seed)
    for _, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            variable.set_value(variable[...] + jnp.asarray(0.1 * rng.randn(*variable.shape), jnp.float32))
    return module


def weights(module) -> dict[str, np.ndarray]:
    """Flattened '/'-joined parameter paths → arrays, for copying into torch restatements."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {"/".join(str(p) for p in path): np.asarray(v[...]) for path, v in flat}


def t(array: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(array))


@pytest.mark.parametrize("select", ["patch", "cls_patch"])
@pytest.mark.parametrize("config", KINDS, ids=lambda c: c.kind)
def test_output_count_equals_model_image_tokens(config, select):
    for kind in ("dinov2", "siglip"):  # with and without a CLS token
        vision = dataclasses.replace(VISION, kind=kind, feature_select=select)
        resampler = make_resampler(config, vision, rngs=nnx.Rngs(0))
        expected = ModelConfig(vision=vision, resampler=config).image_tokens
        out = jax.eval_shape(resampler, jax.ShapeDtypeStruct((2, vision.output_tokens, 32), jnp.float32))
        assert out.shape == (2, expected, 32)


def test_identity_has_no_parameters_and_returns_its_input():
    resampler = make_resampler(ResamplerConfig("identity"), VISION, rngs=nnx.Rngs(0))
    assert not jax.tree.leaves(nnx.state(resampler, nnx.Param))
    x = features(VISION)
    np.testing.assert_array_equal(np.asarray(resampler(jnp.asarray(x))), x)


def test_avg_pool_averages_each_stride_window_and_keeps_cls_in_front():
    vision = VisionConfig(kind="dinov2", image_size=56, patch_size=14, hidden_size=2, num_heads=1,
                          feature_select="cls_patch")
    grid = np.arange(16, dtype=np.float32)  # 4×4 grid, row-major
    x = np.concatenate([[[-7.0, -8.0]], np.stack([grid, 100 + grid], axis=-1)])[None]
    out = make_resampler(ResamplerConfig("avg_pool", pool_stride=2), vision, rngs=nnx.Rngs(0))(jnp.asarray(x))
    # windows {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}
    np.testing.assert_allclose(np.asarray(out[0]), [[-7, -8], [2.5, 102.5], [4.5, 104.5], [10.5, 110.5],
                                                    [12.5, 112.5]])
    # stride 3 on 4×4: one window {0,1,2,4,5,6,8,9,10}; the last row and column are dropped
    patch_only = dataclasses.replace(vision, feature_select="patch")
    out = make_resampler(ResamplerConfig("avg_pool", pool_stride=3), patch_only, rngs=nnx.Rngs(0))(
        jnp.asarray(x[:, 1:]))
    np.testing.assert_allclose(np.asarray(out[0]), [[5.0, 105.0]])


class TorchPerceiverLayer(torch.nn.Module):
    """Flamingo's PerceiverAttention + FeedForward, restated (fused to_kv, scaled dot product)."""

    def __init__(self, width, heads, mult, eps):
        super().__init__()
        self.heads = heads
        self.norm_media, self.norm_latents = torch.nn.LayerNorm(width, eps=eps), torch.nn.LayerNorm(width, eps=eps)
        self.to_q = torch.nn.Linear(width, width, bias=False)
        self.to_kv = torch.nn.Linear(width, 2 * width, bias=False)
        self.to_out = torch.nn.Linear(width, width, bias=False)
        self.ff = torch.nn.Sequential(torch.nn.LayerNorm(width, eps=eps),
                                      torch.nn.Linear(width, mult * width, bias=False),
                                      torch.nn.GELU(), torch.nn.Linear(mult * width, width, bias=False))

    def forward(self, media, latents):
        media, normed = self.norm_media(media), self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([media, normed], dim=1)).chunk(2, dim=-1)
        split = lambda z: z.reshape(z.shape[0], z.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.to_q(normed)), split(k), split(v)
        attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(latents.shape)
        latents = self.to_out(out) + latents
        return self.ff(latents) + latents


def test_perceiver_matches_a_torch_flamingo_perceiver():
    config = ResamplerConfig("perceiver", num_latents=9, depth=2, num_heads=4, ff_mult=2)
    resampler = perturb(make_resampler(config, VISION, rngs=nnx.Rngs(1)), 1)
    w = weights(resampler)
    layers = []
    with torch.no_grad():
        for i in range(config.depth):
            p = lambda name: t(w[f"layers/{i}/{name}"])  # noqa: E731
            layer = TorchPerceiverLayer(32, 4, 2, config.layer_norm_eps)
            layer.norm_media.weight.copy_(p("norm_media/scale"))
            layer.norm_media.bias.copy_(p("norm_media/bias"))
            layer.norm_latents.weight.copy_(p("norm_latents/scale"))
            layer.norm_latents.bias.copy_(p("norm_latents/bias"))
            layer.to_q.weight.copy_(p("query/kernel").T)
            layer.to_kv.weight.copy_(torch.cat([p("key/kernel").T, p("value/kernel").T]))
            layer.to_out.weight.copy_(p("out/kernel").T)
            layer.ff[0].weight.copy_(p("ff_norm/scale"))
            layer.ff[0].bias.copy_(p("ff_norm/bias"))
            layer.ff[1].weight.copy_(p("ff_in/kernel").T)
            layer.ff[3].weight.copy_(p("ff_out/kernel").T)
            layers.append(layer)
    x = features(VISION)
    with torch.no_grad():
        latents = t(w["latents"])[None].expand(2, -1, -1)
        for layer in layers:
            latents = layer(t(x), latents)
        expected = F.layer_norm(latents, (32,), t(w["norm/scale"]), t(w["norm/bias"]), config.layer_norm_eps)
    out = resampler(jnp.asarray(x))
    assert out.shape == (2, 9, 32)
    assert float(np.abs(np.asarray(out) - expected.numpy()).max()) <= ATOL


def torch_windowed_token_packer(w: dict, x: np.ndarray, g: int, s: int, heads: int, eps: float) -> np.ndarray:
    """Upstream TokenPacker semantics with explicit per-window nn.MultiheadAttention calls (no reshapes shared
    with the JAX code): query (i, j) sees keys of grid rows i·s..i·s+s-1 and columns j·s..j·s+s-1."""
    b, n, d = x.shape
    a = int(round(n ** 0.5))
    grid = t(x).reshape(b, a, a, d).permute(0, 3, 1, 2)
    q0 = F.interpolate(grid, size=(g, g), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    kv0 = grid if a == g * s else F.interpolate(grid, size=(g * s, g * s), mode="bilinear", align_corners=False)
    kv0 = kv0.permute(0, 2, 3, 1)

    def mlp_ln(z, name):
        z = F.linear(z, t(w[f"{name}_mlp/fc1/kernel"].T), t(w[f"{name}_mlp/fc1/bias"]))
        z = F.linear(F.gelu(z), t(w[f"{name}_mlp/fc2/kernel"].T), t(w[f"{name}_mlp/fc2/bias"]))
        return F.layer_norm(z, (d,), t(w[f"{name}_norm/scale"]), t(w[f"{name}_norm/bias"]), eps)

    q, k, v = mlp_ln(q0, "q"), mlp_ln(kv0, "k"), mlp_ln(kv0, "v")
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(t(np.concatenate([w[f"{p}/kernel"].T for p in ("query", "key", "value")])))
        mha.in_proj_bias.copy_(t(np.concatenate([w[f"{p}/bias"] for p in ("query", "key", "value")])))
        mha.out_proj.weight.copy_(t(w["attention_out/kernel"].T))
        mha.out_proj.bias.copy_(t(w["attention_out/bias"]))
        rows = []
        for i in range(g):
            for j in range(g):
                keys = k[:, i * s:(i + 1) * s, j * s:(j + 1) * s].reshape(b, s * s, d)
                values = v[:, i * s:(i + 1) * s, j * s:(j + 1) * s].reshape(b, s * s, d)
                rows.append(mha(q[:, i, j][:, None], keys, values, need_weights=False)[0])
        attended = torch.cat(rows, dim=1)
        return (q0.reshape(b, g * g, d) + F.linear(attended, t(w["out/kernel"].T))).numpy()


@pytest.mark.parametrize("num_latents,window", [(16, 4), (25, 4)], ids=["16x16-to-4x4", "16x16-to-5x5-via-20x20"])
def test_token_packer_matches_a_torch_windowed_restatement(num_latents, window):
    config = ResamplerConfig("token_packer", num_latents=num_latents, num_heads=4)
    vision = dataclasses.replace(VISION, feature_select="cls_patch")  # the CLS token is dropped
    packer = perturb(make_resampler(config, vision, rngs=nnx.Rngs(2)), 2)
    assert packer.window == window
    w = weights(packer)
    x = features(vision)
    g = int(num_latents ** 0.5)
    expected = torch_windowed_token_packer(w, x[:, 1:], g, window, 4, config.layer_norm_eps)
    out = packer(jnp.asarray(x))
    assert out.shape == (2, num_latents, 32)
    assert float(np.abs(np.asarray(out) - expected).max()) <= ATOL


def test_token_packer_query_sees_only_its_own_window():
    # 16×16 grid, 4×4 queries, s = 4: query 0 owns patch rows 0–3 × columns 0–3;
    # its bilinear q0 reads only rows/columns 1–2.
    packer = perturb(make_resampler(ResamplerConfig("token_packer", num_latents=16, num_heads=4), VISION,
                                    rngs=nnx.Rngs(3)), 3)
    forward = jax.jit(lambda x: packer(x))
    x = features(VISION, batch=1).reshape(1, 16, 16, 32)
    base = np.asarray(forward(jnp.asarray(x.reshape(1, 256, 32))))

    def perturbed(row, col):
        y = x.copy()
        y[0, row, col] += 5.0
        return np.asarray(forward(jnp.asarray(y.reshape(1, 256, 32))))

    outside = perturbed(10, 13)  # window (2, 3) = query 11
    np.testing.assert_array_equal(outside[0, 0], base[0, 0])
    assert np.abs(outside[0, 11] - base[0, 11]).max() > 1e-3
    changed = [q for q in range(16) if np.abs(outside[0, q] - base[0, q]).max() > 0]
    assert changed == [11]
    inside = perturbed(3, 0)  # in query 0's key window, outside its bilinear footprint
    assert np.abs(inside[0, 0] - base[0, 0]).max() > 1e-3


def test_resampler_parameters_carry_logical_axes():
    for config in KINDS[1:3]:
        module = make_resampler(config, VISION, rngs=nnx.Rngs(0))
        for variable in jax.tree.leaves(nnx.state(module, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
            axes = variable.get_metadata().get("axes")
            assert axes is not None and len(axes) == variable.ndim
