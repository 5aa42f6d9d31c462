"""The system prompt a chat template adds to a conversation without one is found by rendering the template with a
marked system message and without (issue 18, item 10)."""

from __future__ import annotations

from tests.tiny import CHATML, build_tokenizer
from usf_bios.engine.data import template_system_prompt

DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2's template: a default system turn when the conversation has none
WITH_DEFAULT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
REFUSES_SYSTEM = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                  "{{ raise_exception('no system role') }}{% endif %}{{ message['content'] }}{% endfor %}")


def test_a_template_that_adds_a_system_prompt(tmp_path):
    assert template_system_prompt(build_tokenizer(tmp_path / "smol", WITH_DEFAULT)) == DEFAULT


def test_templates_that_add_none(tmp_path):
    assert template_system_prompt(build_tokenizer(tmp_path / "chatml", CHATML)) is None
    assert template_system_prompt(build_tokenizer(tmp_path / "none", None)) is None
    assert template_system_prompt(build_tokenizer(tmp_path / "refuses", REFUSES_SYSTEM)) is None
