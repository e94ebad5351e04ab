"""AUTOMATIC1111's prompt syntax, parsed (pure Python: `worker.image.conditioning` turns
the result into text embeddings).

Two passes, as A1111 makes them (its wiki, "Features": attention/emphasis, prompt editing,
BREAK):

- `schedule(prompt, steps)`: prompt editing. `[from:to:when]` reads `from` up to step
  `when` and `to` after it (`when` below 1 is a fraction of `steps`, else a step number);
  `[to:when]` adds `to` at `when`, `[from::when]` removes `from` at `when`; `[a|b]`
  alternates every step. The answer is a list of `(end, text)`: text k is used while the
  0-based sampling step is at most `end` of the first entry that covers it. A prompt this
  grammar cannot parse (an unbalanced `|`, a trailing backslash) is used as written.
- `attention(text)`: emphasis. `(x)` multiplies the weight of x by 1.1, `[x]` divides it
  by 1.1, `(x:1.3)` multiplies it by 1.3; groups nest (weights multiply), an unclosed group
  runs to the end, `\\(` `\\)` `\\[` `\\]` are literal brackets, and the word `BREAK` starts a
  new 75-token chunk. Adjacent fragments of equal weight are merged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "BREAK",
    "Fragment",
    "PromptSyntaxError",
    "ScheduledText",
    "attention",
    "schedule",
]

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1


class PromptSyntaxError(ValueError):
    """A prompt's syntax asks for something impossible (a weight that is not a number)."""


@dataclass
class Fragment:
    """Text and its weight; `is_break` marks A1111's BREAK (a new chunk)."""

    text: str
    weight: float
    is_break: bool = False


BREAK = "BREAK"


@dataclass(frozen=True)
class ScheduledText:
    """The prompt's text up to and including 0-based sampling step `end`."""

    end: int
    text: str


# --- emphasis ----------------------------------------------------------------------------

# one lexical unit of the emphasis pass, tried in this order:
# an escaped bracket or backslash, a lone backslash, an opening bracket, ":weight)"
# (group 1: the weight), a closing bracket, a run of plain text, a lone colon
_EMPHASIS_UNIT = re.compile(
    r"\\[()\[\]\\]"
    r"|\\"
    r"|[(\[]"
    r"|:\s*([+-]?[.\d]+)\s*\)"
    r"|[)\]]"
    r"|[^\\()\[\]:]+"
    r"|:"
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def attention(text: str) -> list[Fragment]:
    """`text`'s fragments with their weights (see the module's docstring)."""
    out: list[Fragment] = []
    # start indices (into `out`) of the groups still open
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in out[start:]:
            fragment.weight *= factor

    for match in _EMPHASIS_UNIT.finditer(text):
        unit, weight = match.group(0), match.group(1)
        if unit.startswith("\\"):
            # an escaped character stands for itself; a lone backslash for nothing
            out.append(Fragment(unit[1:], 1.0))
        elif unit == "(":
            rounds.append(len(out))
        elif unit == "[":
            squares.append(len(out))
        elif weight is not None and rounds:
            try:
                factor = float(weight)
            except ValueError:
                raise PromptSyntaxError(
                    f"{weight!r} in {unit!r} is not a number; write a weight such as (word:1.2)"
                ) from None
            scale(rounds.pop(), factor)
        elif unit == ")" and rounds:
            scale(rounds.pop(), ROUND_FACTOR)
        elif unit == "]" and squares:
            scale(squares.pop(), SQUARE_FACTOR)
        else:
            for i, part in enumerate(_BREAK_WORD.split(unit)):
                if i:
                    out.append(Fragment(BREAK, -1.0, is_break=True))
                out.append(Fragment(part, 1.0))
    # groups left open run to the end
    for start in rounds:
        scale(start, ROUND_FACTOR)
    for start in squares:
        scale(start, SQUARE_FACTOR)
    if not out:
        return [Fragment("", 1.0)]
    merged = [out[0]]
    for fragment in out[1:]:
        last = merged[-1]
        if fragment.weight == last.weight and fragment.is_break == last.is_break:
            last.text += fragment.text
        else:
            merged.append(fragment)
    return merged


# --- prompt editing ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Scheduled:
    before: list[_Node]
    after: list[_Node]
    when: float


@dataclass(frozen=True)
class _Alternate:
    options: list[list[_Node]]


_Node = str | _Scheduled | _Alternate


class _NoParse(Exception):
    """This reading of the text fails (another may not)."""


# plain text: anything but the syntax's characters, or a backslash and the character after it
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_WHEN_CLOSE = re.compile(rf"\s*({_NUMBER})\s*\]")
_ONLY_NUMBER = re.compile(rf"\s*({_NUMBER})\s*")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _plain(self) -> str:
        match = _PLAIN.match(self.text, self.pos)
        if match is None:  # a backslash at the very end
            raise _NoParse
        self.pos = match.end()
        return match.group(0)

    def top(self) -> list[_Node]:
        """The whole text: stray `[ ] ( ) :` are literal; a stray `|` is not parseable."""
        nodes: list[_Node] = []
        while self.pos < len(self.text):
            char = self._peek()
            if char in "([":
                start = self.pos
                try:
                    nodes.extend(self._paren() if char == "(" else self._bracket())
                except _NoParse:
                    self.pos = start + 1
                    nodes.append(char)
            elif char in ")]:":
                self.pos += 1
                nodes.append(char)
            elif char == "|":
                raise _NoParse
            else:
                nodes.append(self._plain())
        return nodes

    def _sequence(self) -> list[_Node]:
        """Text inside a construct, up to one of `) ] : |` or the end."""
        nodes: list[_Node] = []
        while (char := self._peek()) and char not in ")]:|":
            if char == "(":
                nodes.extend(self._paren())
            elif char == "[":
                nodes.extend(self._bracket())
            else:
                nodes.append(self._plain())
        return nodes

    def _expect(self, char: str) -> None:
        if self._peek() != char:
            raise _NoParse
        self.pos += 1

    def _paren(self) -> list[_Node]:
        """`(x)` or `(x:y)`, kept as text for the emphasis pass."""
        self._expect("(")
        nodes: list[_Node] = ["(", *self._sequence()]
        if self._peek() == ":":
            self.pos += 1
            nodes += [":", *self._sequence()]
        self._expect(")")
        nodes.append(")")
        return nodes

    def _when_close(self) -> float:
        match = _WHEN_CLOSE.match(self.text, self.pos)
        if match is None:
            raise _NoParse
        self.pos = match.end()
        return float(match.group(1))

    def _bracket(self) -> list[_Node]:
        """`[x]` (kept as text), `[a|b|…]`, `[to:when]` or `[from:to:when]`."""
        self._expect("[")
        first = self._sequence()
        char = self._peek()
        if char == "]":
            self.pos += 1
            return ["[", *first, "]"]
        if char == "|":
            options = [first]
            while self._peek() == "|":
                self.pos += 1
                options.append(self._sequence())
            self._expect("]")
            return [_Alternate(options)]
        self._expect(":")
        second_start = self.pos
        second = self._sequence()
        if self._peek() == ":":
            self.pos += 1
            return [_Scheduled(first, second, self._when_close())]
        # [to:when]: what followed the colon must be the number alone
        self.pos = second_start
        return [_Scheduled([], first, self._when_close())]


def _end_step(when: float, steps: int) -> int:
    return min(steps, int(when * steps if when < 1 else when))


def _steps_of(nodes: list[_Node], steps: int, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            end = _end_step(node.when, steps)
            if end >= 1:
                found.add(end)
            _steps_of(node.before, steps, found)
            _steps_of(node.after, steps, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _steps_of(option, steps, found)


def _render(nodes: list[_Node], step: int, steps: int) -> str:
    parts: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            chosen = node.before if step <= _end_step(node.when, steps) else node.after
            parts.append(_render(chosen, step, steps))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(parts)


def schedule(prompt: str, steps: int) -> list[ScheduledText]:
    """The texts `prompt` reads as over `steps` sampling steps (see the module's docstring);
    one entry, `prompt` itself, when it edits nothing."""
    try:
        nodes = _Parser(prompt).top()
    except _NoParse:
        return [ScheduledText(steps, prompt)]
    found = {steps}
    _steps_of(nodes, steps, found)
    return [ScheduledText(step, _render(nodes, step, steps)) for step in sorted(found)]
