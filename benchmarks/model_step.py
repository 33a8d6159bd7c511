"""Model forward+backward throughput: step time, tokens/s and MFU for text and image microbatches.

    python benchmarks/model_step.py [--lm baby_llama|llama_1b|tiny] [--vision dinov2_large|tiny|none]
                                    [--batch 8] [--seq 1024] [--steps 5] [--dtype bfloat16]
                                    [--remat none|full|save_dots] [--modality text image] [--torch]

Presets are read from configs/presets/{lm,vision}/*.yaml. One step is the
gradient of the summed next-token cross-entropy with respect to the trainable
parameters (the LM and projector; the frozen tower runs forward only), no
optimizer update. Random weights and tokens; image rows put the N placeholders
after a BOS token.

FLOPs (PaLM appendix B convention): training = 6 · P_matmul · tokens + 12 · L · T · (N·H) · tokens
for the LM (P_matmul: every LM weight matrix including the output layer, not the
input embedding; attention counted over the full T×T square), plus for image
rows 2 · P_tower · patches + 4 · L_v · T_v · D_v · patches (forward only, frozen)
and 6 · P_projector · N. MFU = FLOPs / time / peak, with the dense bf16 peak of
the device kind (jaxllava/train/metrics.py: H100/H200 989 TFLOP/s, A100 312),
the same FLOPs and peaks the training loop logs; unknown devices and CPUs
report tokens/s only.

--torch also times transformers' LlamaForCausalLM (same shapes and --dtype, on
CUDA when torch sees it, else CPU) for the JAX ÷ PyTorch speed ratio.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import yaml

PRESETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "presets")


def load_model_config(lm: str, vision: str, dtype: str, remat: str):
    from jaxllava.model.config import LlamaConfig, ModelConfig, VisionConfig

    def section(kind, name, key):
        with open(os.path.join(PRESETS, kind, f"{name}.yaml")) as f:
            return yaml.safe_load(f)["model"][key]

    vision_cfg = None if vision == "none" else VisionConfig(**section("vision", vision, "vision"))
    return ModelConfig(lm=LlamaConfig(**section("lm", lm, "lm")), vision=vision_cfg, dtype=dtype,
                       attention_impl="auto", remat=remat)


def image_train_flops(model_cfg) -> float:
    """Per image: frozen tower forward + trainable projector forward/backward."""
    v = model_cfg.vision
    tokens = v.grid ** 2 + int(v.has_cls)
    tower = v.num_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    tower_flops = 2 * tower * tokens + 4 * v.num_layers * tokens * v.hidden_size * tokens
    depth = model_cfg.projector.depth
    d_lm = model_cfg.lm.hidden_size
    projector = v.hidden_size * d_lm + (depth - 1) * d_lm * d_lm
    return tower_flops + 6 * projector * model_cfg.image_tokens


def make_batch(model_cfg, modality: str, batch: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "input_ids": rng.integers(3, model_cfg.lm.vocab_size, (batch, seq), dtype=np.int32),
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    }
    if modality == "image":
        n, size = model_cfg.image_tokens, model_cfg.vision.image_size
        if n + 2 > seq:
            raise SystemExit(f"--seq {seq} cannot hold {n} image tokens")
        mask = np.zeros((batch, seq), bool)
        mask[:, 1:1 + n] = True
        arrays["image_mask"] = mask
        arrays["pixels"] = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    return arrays


def time_jax(model_cfg, modality: str, batch: int, seq: int, steps: int) -> float:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxllava.model.llava import LlavaModel

    model = LlavaModel(model_cfg, rngs=nnx.Rngs(0))
    trainable = (lambda path, node: isinstance(node, nnx.Param) and path[0] != "vision")  # frozen, as trained
    graphdef, params, rest = nnx.split(model, trainable, ...)
    arrays = {k: jnp.asarray(v) for k, v in make_batch(model_cfg, modality, batch, seq).items()}

    @jax.jit
    def step(params, rest, arrays):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, rest)
            logits = m(arrays["input_ids"], segment_ids=arrays["segment_ids"], positions=arrays["positions"],
                       pixels=arrays.get("pixels"), image_mask=arrays.get("image_mask"))
            targets = jnp.roll(arrays["input_ids"], -1, axis=1)
            picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked)

        return jax.value_and_grad(loss_fn)(params)

    jax.block_until_ready(step(params, rest, arrays))  # compile
    start = time.perf_counter()
    for _ in range(steps):
        out = step(params, rest, arrays)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def time_torch(model_cfg, batch: int, seq: int, steps: int) -> tuple[float, str]:
    import torch
    import transformers

    from jaxllava.convert.hf_configs import llama_config_to_hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, model_cfg.dtype)
    hf_cfg = transformers.LlamaConfig(**llama_config_to_hf(model_cfg.lm))
    model = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype)
    if model_cfg.remat != "none":
        model.gradient_checkpointing_enable()
    ids = torch.randint(3, model_cfg.lm.vocab_size, (batch, seq), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, f"{device} {str(dtype).replace('torch.', '')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", default="baby_llama")
    parser.add_argument("--vision", default="dinov2_large", help="a vision preset, or 'none' for text only")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    parser.add_argument("--modality", nargs="+", default=["text", "image"], choices=["text", "image"])
    parser.add_argument("--torch", action="store_true", help="also time transformers' LlamaForCausalLM")
    args = parser.parse_args()

    import jax

    from jaxllava.train.metrics import lm_flops_per_token, peak_flops

    model_cfg = load_model_config(args.lm, args.vision, args.dtype, args.remat)
    device = jax.devices()[0]
    peak = peak_flops(device)
    print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} visible), jax {jax.__version__}, "
          f"python {platform.python_version()}")
    print(f"lm {args.lm} + vision {args.vision}; batch {args.batch} × seq {args.seq}; dtype {args.dtype}; "
          f"remat {args.remat}; attention {model_cfg.attention_impl}")
    lm_flops = lm_flops_per_token(model_cfg.lm, args.seq) * args.batch * args.seq
    for modality in args.modality:
        if modality == "image" and model_cfg.vision is None:
            print("image: skipped (no vision tower)")
            continue
        seconds = time_jax(model_cfg, modality, args.batch, args.seq, args.steps)
        flops = lm_flops + (image_train_flops(model_cfg) * args.batch if modality == "image" else 0)
        line = (f"jax   {modality:5s}: {seconds * 1e3:9.1f} ms/step  {args.batch * args.seq / seconds:12,.0f} tokens/s  "
                f"{flops / seconds / 1e12:8.2f} TFLOP/s")
        if peak:
            line += f"  MFU {100 * flops / seconds / peak:5.1f} %"
        print(line)
        if modality == "text" and args.torch:
            torch_seconds, where = time_torch(model_cfg, args.batch, args.seq, args.steps)
            print(f"torch text : {torch_seconds * 1e3:9.1f} ms/step  "
                  f"{args.batch * args.seq / torch_seconds:12,.0f} tokens/s  ({where}; "
                  f"jax is {torch_seconds / seconds:.2f}× the speed of transformers)")


if __name__ == "__main__":
    main()
