"""The LLaVA-style model: Llama decoder, vision towers, resamplers, projectors, and their configs.

Axis letters, used in shapes throughout the project:
  B  batch                    T  sequence length          S  key/value length
  N  query heads              K  key/value heads          G  = N // K, query heads per kv head
  H  head dim                 D  LM width                 E  vision width
  F  MLP width                V  vocabulary               I  image tokens per image
  P  = patch · patch · 3, one flattened RGB patch

Errors: a model module raises only `ValueError`, and only for a call with wrong
shapes (a programming error). A configuration mistake is a `ConfigError`, raised
by the config dataclasses in `model/config.py` when a config is loaded, so model
constructors do not check their config again. Loading and conversion errors
(`ConversionError`: a missing tensor, a mis-shaped one, an unsupported
checkpoint) belong to `jaxllava.convert`; `model/` only declares the key maps
between parameter paths and transformers names (`hf_keys`).
"""
