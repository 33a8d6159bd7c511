"""jaxllava: LLaVA-family multimodal language models in pure JAX, trained BabyLM-style on mixed
text-only and image-caption data and scored on minimal pairs (see README.md).

Axis letters, used in shapes throughout the project:
  B  batch                    T  sequence length          S  key/value length
  N  query heads              K  key/value heads          G  = N // K, query heads per kv head
  H  head dim                 D  LM width                 E  vision width
  F  MLP width                V  vocabulary               I  image tokens per image
  P  = patch · patch · 3, one flattened RGB patch
"""
