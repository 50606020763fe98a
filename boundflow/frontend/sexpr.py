"""S-expressions, as VNN-LIB (a subset of SMT-LIB 2) writes them.

:func:`parse` reads text into nested lists in one pass with an explicit stack: linear in the
text and safe at any nesting depth (no recursion). ``;`` starts a comment to the end of the
line. Leaves are strings (equal leaves share one object, which keeps large files small in
memory); each list is an :class:`Expr` carrying the line it opens on, which is the line error
messages name for it and for its leaves.
"""

from __future__ import annotations

import re

from boundflow.errors import BoundFlowError

_TOKEN = re.compile(r"[()]|[^\s();]+")


class Expr(list):
    """A parenthesised list of leaves (``str``) and sub-lists, with the line it opens on."""

    __slots__ = ("line",)


def parse(text: str, error: type[BoundFlowError]) -> list[Expr]:
    """The top-level lists of ``text``. Unbalanced parentheses and a bare leaf at the top
    level raise ``error`` naming the line."""
    root: list = []
    stack: list[list] = [root]
    top = root                                   # stack[-1]
    leaves: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if ";" in line:
            line = line[:line.index(";")]
        for tok in _TOKEN.findall(line):
            if tok == "(":
                e = Expr()
                e.line = lineno
                top.append(e)
                stack.append(e)
                top = e
            elif tok == ")":
                if top is root:
                    raise error(f"line {lineno}: unbalanced ')'")
                stack.pop()
                top = stack[-1]
            elif top is root:
                raise error(f"line {lineno}: expected a parenthesised command, got {tok!r}")
            else:
                top.append(leaves.setdefault(tok, tok))
    if top is not root:
        raise error(f"line {top.line}: '(' is never closed")
    return root


def head(e) -> str:
    """The operator of a list whose first element is a leaf, else ``""``."""
    return e[0] if isinstance(e, Expr) and e and isinstance(e[0], str) else ""


def describe(e) -> str:
    """A short rendering of a leaf or a list for error messages: ``'x'``, ``'(op ...)'``."""
    if isinstance(e, str):
        return repr(e)
    if not e:
        return "'()'"
    return f"'({head(e)} ...)'" if head(e) else "'((...) ...)'"
