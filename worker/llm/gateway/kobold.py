"""KoboldAI's context cut and output formatting, as the gateway applies them to a job.

`fit_context` keeps a prompt's last tokens (`max_context_length` - `max_length` of them),
as KoboldAI does with a story longer than its context. `format_output` applies the `frmt*`
flags to the final text: their descriptions are AI Horde's (horde/apis/models/kobold_v2.py
in Haidra-Org/AI-Horde); the README's "KoboldAI samplers" lists them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["SPECIAL_CHARS", "fit_context", "format_output"]

# what frmtrmspch removes
SPECIAL_CHARS = "#/@%}{+=~|\\^<>"
_SPECIAL = re.compile("[" + re.escape(SPECIAL_CHARS) + "]")
_BLANK_LINES = re.compile(r"\n{2,}")
# a sentence ends at . ! or ?, with the closing quotes, brackets or asterisks after it
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]*]*")


def fit_context(ids: Sequence[int], budget: int, bos_token_id: int | None) -> list[int]:
    """The last `budget` tokens of `ids` (all of them if they fit). A leading BOS token
    stays in front, as the model expects a sequence to start with it."""
    if budget < 1:
        raise ValueError(f"budget is {budget}; at least one prompt token must fit")
    kept = list(ids)
    if len(kept) <= budget:
        return kept
    if bos_token_id is not None and kept[0] == bos_token_id and budget >= 2:
        return [kept[0], *kept[len(kept) - budget + 1 :]]
    return kept[len(kept) - budget :]


def format_output(
    text: str,
    prompt: str,
    *,
    trim_incomplete: bool = False,
    remove_blank_lines: bool = False,
    remove_special: bool = False,
    add_space: bool = False,
) -> str:
    """The generated `text` with KoboldAI's output formatting, in this order:
    `trim_incomplete` (frmttriminc) cuts what follows the last sentence end, if there is
    one; `remove_blank_lines` (frmtrmblln) turns each run of newlines into one;
    `remove_special` (frmtrmspch) drops the characters of SPECIAL_CHARS; `add_space`
    (frmtadsnsp) puts a space before text that does not start with whitespace when the
    `prompt` it continues does not end with whitespace."""
    if trim_incomplete:
        ends = list(_SENTENCE_END.finditer(text))
        if ends:
            text = text[: ends[-1].end()]
    if remove_blank_lines:
        text = _BLANK_LINES.sub("\n", text)
    if remove_special:
        text = _SPECIAL.sub("", text)
    if add_space and text and not text[0].isspace() and prompt and not prompt[-1].isspace():
        text = " " + text
    return text
