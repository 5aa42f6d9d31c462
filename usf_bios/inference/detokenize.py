"""A row's text kept up to date one token at a time, equal to decoding all of its tokens at every step.

Decoding the whole answer again after every token costs time that grows with the answer (quadratic over a long
one). ``IncrementalText`` decodes only a short window: the tokens since the last point where the text was complete
(no incomplete UTF-8 character at its end), after a few tokens before that point as context, so that what a
decoder does at the start of a call (SentencePiece drops the first token's leading space) falls on the context.
The window's text must begin with the context's own text; where it does not (a decoder that rewrites across
tokens, such as ``clean_up_tokenization_spaces``), the whole text is decoded, as before.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"   # what the tokenizer shows for the bytes of a character not yet complete


def decode(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


class IncrementalText:
    """``text(tokens)`` is ``decode(tokenizer, tokens)``; call it after each token appended to ``tokens``.

    Invariants: ``done`` is the text of ``tokens[:read]``; ``head`` is the text of ``tokens[start:read]`` (the
    context), never empty once there is text, so that a decoder's first-token rule never reaches ``done``'s end.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.done, self.head = "", ""
        self.start = self.read = 0

    def text(self, tokens: list[int]) -> str:
        window = decode(self.tokenizer, tokens[self.start:])
        if not window.startswith(self.head):
            return decode(self.tokenizer, tokens)
        tail = window[len(self.head):]
        if not tail or tail.endswith(REPLACEMENT):   # nothing new, or a character still incomplete
            return self.done + tail
        self.done += tail
        head = decode(self.tokenizer, tokens[self.read:])
        if head and window.endswith(head):   # the new tokens are the next context
            self.start, self.head = self.read, head
        else:                                # they decode to nothing alone (special tokens): keep the old one too
            self.head = window
        self.read = len(tokens)
        return self.done
