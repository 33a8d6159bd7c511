"""Conversation templates for the `chat` objective.

A template says how each turn is wrapped; the assistant's words (and the end
token after them) are the only targets. Adding a template is one entry in
`TEMPLATES`.

llama_2 follows LLaVA's `conv_llama_2` layout: `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] ...`.
The reference trained with the long Llama-2 safety system prompt and scored BLiMP
on bare sentences (README pitfall 6); here the system prompt is empty
unless a template sets one.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    user: str  # wraps a user turn; "{text}" (once) is the turn's text
    assistant: str  # wraps an assistant turn (the part that is trained on)
    system: str = ""  # a system prompt, placed with the first user turn when non-empty
    system_format: str = "{system}"
    # Where the system prompt goes: inside the first user turn's wrapper, before its text
    # (Llama 2: "[INST] <<SYS>>...<</SYS>> text [/INST]"), or before the wrapper (Vicuna:
    # "system USER: text ASSISTANT:").
    system_before_user: bool = False
    end_assistant_with_eos: bool = True  # the tokenizer's EOS follows each assistant turn, as a target
    bos_each_round: bool = False  # a BOS before every user turn after the first


TEMPLATES: dict[str, ChatTemplate] = {
    "llama_2": ChatTemplate(
        user="[INST] {text} [/INST]",
        assistant=" {text} ",
        system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
        bos_each_round=True,
    ),
    "vicuna_v1": ChatTemplate(
        user="USER: {text} ASSISTANT:",
        assistant=" {text}",
        system="A chat between a curious user and an artificial intelligence assistant.",
        system_format="{system} ",
        system_before_user=True,
    ),
}


def user_turn(template: ChatTemplate, text: str, *, first: bool) -> tuple[str, str]:
    """(what comes before the turn's text, the text and what follows it) of a user turn. The
    image of an image record goes between the two: right before the turn's text, inside the
    wrapper and after any system prompt, as LLaVA places `<image>`."""
    head, tail = template.user.split("{text}")
    if first and template.system:
        system = template.system_format.format(system=template.system)
        head = system + head if template.system_before_user else head + system
    return head, text + tail


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise KeyError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]
