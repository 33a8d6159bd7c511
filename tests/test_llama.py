"""Llama decoder parity with transformers' LlamaForCausalLM (tiny random configs, fp32, CPU)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from jaxllava.convert.checkpoint_files import CheckpointTensors, read_config
from jaxllava.convert.hf_configs import llama_config_from_hf, llama_config_to_hf
from jaxllava.convert.weights import hf_state_dict, load_hf_llama_weights
from jaxllava.errors import ConversionError
from jaxllava.model.attention import attention, resolve_implementation
from jaxllava.model.layers import RMSNorm
from jaxllava.model.llama import Llama

VOCAB = 101
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
# Small theta so that positions up to ~80 rotate every frequency pair many times.
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, rope_theta=30.0, rms_norm_eps=1e-5, max_position_embeddings=128,
            tie_word_embeddings=False)
CONFIGS = {
    "mha_untied": {},
    "gqa_tied_llama3_rope": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500.0,
                                 rope_scaling=LLAMA3_SCALING),
    "mqa_biases_wide_heads": dict(num_key_value_heads=1, head_dim=16, attention_bias=True, mlp_bias=True),
}
FP32_TOLERANCE = 1e-5
# bf16 compute (fp32 params; RMSNorm statistics, RoPE and softmax in fp32) vs fp32 compute:
# bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.4 %); on these two-layer models the
# largest logit error measured 1.7 % of the largest logit magnitude; the bound is 3 %.
BF16_RELATIVE_TOLERANCE = 3e-2


def _hf_model(directory, name: str, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random LlamaForCausalLM saved to `directory`. Weights are drawn larger than transformers'
    init (std 0.02 gives near-zero logits) and every norm scale differs from 1, so a swapped or
    skipped tensor shows in the logits."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **CONFIGS[name]})).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def _load(directory, *, dtype=jnp.float32, remat="none") -> Llama:
    """Loaded into an abstract model (shapes only, no random init): every parameter comes from the file."""
    config = llama_config_from_hf(read_config(str(directory)))
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, attention_impl="xla", remat=remat, rngs=nnx.Rngs(0)))
    assert load_hf_llama_weights(model, CheckpointTensors(str(directory))) == []
    return model


@jax.jit
def _forward(graphdef, state, ids, segment_ids, positions):
    return nnx.merge(graphdef, state)(ids, segment_ids=segment_ids, positions=positions)


def _logits(model: Llama, ids, segment_ids, positions) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(ids), jnp.asarray(segment_ids), jnp.asarray(positions)))


def _right_padded(lengths, seq_len, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (len(lengths), seq_len)).astype(np.int32)
    real = np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]
    ids = np.where(real, ids, 0)
    segment_ids = real.astype(np.int32)
    positions = np.where(real, np.arange(seq_len)[None, :], 0).astype(np.int32)
    return ids, segment_ids, positions, real


def _hf_logits(hf, ids, attention_mask=None) -> np.ndarray:
    mask = None if attention_mask is None else torch.tensor(attention_mask.astype(np.int64))
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids.astype(np.int64)), attention_mask=mask).logits.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_on_right_padded_rows(tmp_path, name):
    hf = _hf_model(tmp_path, name)
    model = _load(tmp_path)
    ids, segment_ids, positions, real = _right_padded([84, 57], seq_len=84)
    ours = _logits(model, ids, segment_ids, positions)
    ref = _hf_logits(hf, ids, attention_mask=real)
    assert np.isfinite(ours).all()  # padding (segment 0) must not produce NaN
    assert np.abs(ref[real]).max() > 1.0  # a meaningful scale for the 1e-5 bound
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=FP32_TOLERANCE)


def test_packed_rows_give_each_segment_its_own_logits(tmp_path):
    hf = _hf_model(tmp_path, "gqa_tied_llama3_rope")
    model = _load(tmp_path)
    rows, seq_len = [[23, 31, 9], [40, 44]], 84  # the second row is full: no padding at all
    rng = np.random.RandomState(1)
    ids, segment_ids, positions = (np.zeros((len(rows), seq_len), np.int32) for _ in range(3))
    spans = []
    for b, lengths in enumerate(rows):
        start = 0
        for k, n in enumerate(lengths):
            tokens = rng.randint(3, VOCAB, n).astype(np.int32)
            ids[b, start:start + n] = tokens
            segment_ids[b, start:start + n] = k + 1
            positions[b, start:start + n] = np.arange(n)
            spans.append((b, start, tokens))
            start += n
    packed = _logits(model, ids, segment_ids, positions)
    assert np.isfinite(packed).all()
    for b, start, tokens in spans:
        alone = _hf_logits(hf, tokens[None, :])[0]
        np.testing.assert_allclose(packed[b, start:start + len(tokens)], alone, rtol=0, atol=FP32_TOLERANCE)


def test_bf16_compute_stays_close_to_fp32(tmp_path):
    _hf_model(tmp_path, "mha_untied")
    ids, segment_ids, positions, real = _right_padded([84, 57], seq_len=84)  # as the parity test: same compile
    fp32 = _logits(_load(tmp_path, dtype=jnp.float32), ids, segment_ids, positions)
    bf16_model = _load(tmp_path, dtype=jnp.bfloat16)
    bf16 = _logits(bf16_model, ids, segment_ids, positions)
    assert bf16.dtype == np.float32  # logits come back in float32 whatever the compute dtype
    assert bf16_model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32  # params stay float32
    scale = np.abs(fp32[real]).max()
    error = np.abs(bf16[real] - fp32[real]).max()
    assert 0 < error <= BF16_RELATIVE_TOLERANCE * scale


def _loss_and_grads(model: Llama, ids, segment_ids, positions):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params, rest)(ids, segment_ids=segment_ids, positions=positions)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    return jax.value_and_grad(loss_fn), params


def test_remat_policies_keep_outputs_and_gradients(tmp_path):
    _hf_model(tmp_path, "gqa_tied_llama3_rope")
    ids, segment_ids, positions, _ = _right_padded([24, 17], seq_len=24)
    args = (jnp.asarray(ids), jnp.asarray(segment_ids), jnp.asarray(positions))
    fns, params = {}, {}
    for policy in ("none", "full", "save_dots"):
        fns[policy], params[policy] = _loss_and_grads(_load(tmp_path, remat=policy), *args)
        jaxpr = str(jax.make_jaxpr(fns[policy])(params[policy]))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (policy != "none"), policy
    # one compilation for the three variants (compiles dominate this file's run time)
    results = jax.jit(lambda ps: {k: fns[k](p) for k, p in ps.items()})(params)
    loss, grads = results["none"]
    for policy in ("full", "save_dots"):
        np.testing.assert_allclose(results[policy][0], loss, rtol=0, atol=1e-6)
        for a, b in zip(jax.tree.leaves(results[policy][1]), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_missing_tensor_is_named_in_the_error(tmp_path):
    _hf_model(tmp_path, "mha_untied")
    tensors = dict(CheckpointTensors(str(tmp_path)).items())
    del tensors["model.layers.1.mlp.down_proj.weight"]
    model = Llama(llama_config_from_hf(read_config(str(tmp_path))), dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*\(32, 48\).*missing"):
        load_hf_llama_weights(model, tensors)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    _hf_model(tmp_path, "mha_untied")
    tensors = dict(CheckpointTensors(str(tmp_path)).items())
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 32), np.float32)
    model = Llama(llama_config_from_hf(read_config(str(tmp_path))), dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match=r"k_proj\.weight.*checkpoint shape \(16, 32\).*expects \(32, 32\)"):
        load_hf_llama_weights(model, tensors)


def test_prefixed_keys_load_and_foreign_keys_are_reported_unused(tmp_path):
    _hf_model(tmp_path, "mha_untied")
    original = dict(CheckpointTensors(str(tmp_path)).items())
    tensors = {"language_model." + k: v for k, v in original.items()}
    tensors["vision_tower.patch_embed.weight"] = np.zeros((4, 3), np.float32)
    model = Llama(llama_config_from_hf(read_config(str(tmp_path))), dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert load_hf_llama_weights(model, tensors, prefix="language_model.") == ["vision_tower.patch_embed.weight"]
    exported = hf_state_dict(model)
    assert all(np.array_equal(exported[k], v) for k, v in original.items())
    assert sorted(hf_state_dict(model, prefix="language_model.")) == sorted(
        set(tensors) - {"vision_tower.patch_embed.weight"})


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied_llama3_rope"])
def test_export_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, name):
    hf = _hf_model(tmp_path / "in", name)
    original = dict(CheckpointTensors(str(tmp_path / "in")).items())
    model = _load(tmp_path / "in")
    exported = hf_state_dict(model)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key

    out = tmp_path / "out"
    out.mkdir()
    save_file(exported, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llama_config_to_hf(model.config)))
    assert llama_config_from_hf(read_config(str(out))) == model.config
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    ids, _, _, _ = _right_padded([50], seq_len=50)
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf, ids))


def test_config_reads_transformers_4_rope_fields_and_rejects_other_rope_types():
    legacy = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
              "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    cfg = llama_config_from_hf(legacy)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 8.0
    assert cfg.num_kv_heads == 2 and cfg.rms_norm_eps == 1e-6  # transformers' defaults for absent fields
    with pytest.raises(ConversionError, match="rope type 'linear'"):
        llama_config_from_hf({**legacy, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ConversionError, match="model_type 'gpt2'"):
        llama_config_from_hf({**legacy, "model_type": "gpt2"})


def test_gqa_attention_shares_each_kv_head_with_consecutive_query_heads():
    # transformers' repeat_kv gives query head n the kv head n // (N // K).
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(2, 10, 6, 8), jnp.float32)
    k = jnp.asarray(rng.randn(2, 10, 2, 8), jnp.float32)
    v = jnp.asarray(rng.randn(2, 10, 2, 8), jnp.float32)
    segment_ids = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4], jnp.int32)
    run = jax.jit(lambda q, k, v: attention(q, k, v, segment_ids=segment_ids, implementation="xla"))
    grouped = run(q, k, v)
    repeated = run(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2))
    np.testing.assert_allclose(grouped, repeated, rtol=0, atol=1e-6)
    assert np.isfinite(np.asarray(grouped)).all()


def test_auto_attention_uses_xla_off_gpu():
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    expected = "cudnn" if jax.default_backend() == "gpu" else "xla"
    assert resolve_implementation("auto", q, q) == expected
    assert resolve_implementation("auto", q.astype(jnp.float32), q.astype(jnp.float32)) == "xla"  # cuDNN: bf16/fp16 only


def test_bf16_rmsnorm_equals_transformers_llama_rmsnorm_bit_for_bit():
    # transformers: weight (in the model dtype) * normed.to(input dtype). Scales and inputs are
    # drawn in float32, so neither is bf16-representable and every rounding step shows.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.RandomState(0)
    width = 256
    scale = (1.0 + 0.3 * rng.randn(width)).astype(np.float32)
    x = (3.0 * rng.randn(4, 64, width)).astype(np.float32)
    reference = LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(scale))
    reference = reference.to(torch.bfloat16)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    norm = RMSNorm(width, eps=1e-5, dtype=jnp.bfloat16)
    norm.scale.set_value(jnp.asarray(scale))  # float32, as every parameter here
    out = jax.jit(lambda v: norm(v))(jnp.asarray(x).astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(out.astype(jnp.float32)), expected)
