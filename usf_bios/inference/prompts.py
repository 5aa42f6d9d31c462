"""A request's prompt as token ids, with the model's own tokenizer and chat template, and how many new tokens fit
after it; shared by both serving paths (loaded.LoadedBase, vllm_base.VllmBase), so they see the same tokens."""

from __future__ import annotations

from typing import Any

from usf_bios.inference.sampling import RequestError

DEFAULT_MAX_TOKENS = 512


class Encoder:
    """Needs ``tokenizer`` (a transformers tokenizer) and ``context_length`` (the model's, in tokens)."""

    tokenizer: Any
    context_length: int

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("model", "this model has no chat template; use /v1/completions with a prompt")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - the template's own error (a role it does not take, …)
            raise RequestError("messages", f"the model's chat template refused them: {exc}") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def max_new_tokens(self, prompt_tokens: int, asked: int | None) -> int:
        room = self.context_length - prompt_tokens
        if room < 1:
            raise RequestError("messages", f"the prompt has {prompt_tokens} tokens; the model's context holds "
                                           f"{self.context_length}")
        if asked is not None and asked > room:
            raise RequestError("max_tokens", f"{asked} tokens do not fit: the prompt has {prompt_tokens} of the "
                                             f"model's {self.context_length}")
        return asked if asked is not None else min(room, DEFAULT_MAX_TOKENS)
