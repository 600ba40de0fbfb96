"""Griffe extension for the API pages: the docstrings use Sphinx roles
(``:class:`~torchdyn_snopt.nn.GRUCell```), which Markdown would show verbatim. Each role
becomes a code span with the name it refers to (the last dotted part when the target starts
with ``~``, as Sphinx shows it)."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc):`(~?)([^`]+)`")


def _code_span(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring before it is rendered."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_code_span, obj.docstring.value)
