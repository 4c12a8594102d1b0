"""Griffe extension for the API pages: read the reST bits of fla_gsa's docstrings as Markdown.

The docstrings are Google style with a few Sphinx habits that Markdown would print literally:

- roles such as ``:func:`fla_gsa.ops.chunk_gsa``` or ``:class:`Cache``` become cross-references
  (optional ones: a target that is not rendered anywhere becomes plain code, with no warning);
- a paragraph ending in ``::`` (reST's "literal block follows") ends in ``:`` instead, the indented
  block after it being a Markdown code block already;
- an ``Example:`` section is read as Griffe's ``Examples:`` section, so its doctest renders as code;
- an argument line documenting several names at once (``a, b: text``) becomes one entry per name.

Loaded by mkdocstrings through ``extensions: [docs/_ext/griffe_rst_roles.py]`` in ``mkdocs.yml``.
"""
from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|meth|attr|data|mod|obj|exc):`~?([\w.]+)(?:\(\))?`")
LITERAL_MARKER = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)
EXAMPLE_TITLE = re.compile(r"^([ \t]*)Example:[ \t]*$", re.MULTILINE)
GROUPED_ITEM = re.compile(r"^([ \t]+)(\w+(?:,[ \t]*\w+)+):[ \t](.*)$")


def _split_grouped_items(text: str) -> str:
    """``    a, b: text`` (plus its continuation lines) becomes one item per name."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        match = GROUPED_ITEM.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, names, first = match.groups()
        rest = []
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > len(indent):
            rest.append(lines[i])
            i += 1
        for name in (n.strip() for n in names.split(",")):
            out.append(f"{indent}{name}: {first}")
            out.extend(rest)
    return "\n".join(out)


def _resolve(obj: griffe.Object, target: str) -> str:
    """Full path of ``target`` as seen from ``obj`` (its scope, then its parents'); ``target`` itself when
    it is already a full path or cannot be resolved."""
    if target.startswith("fla_gsa."):
        return target
    head, _, rest = target.partition(".")
    scope: Any = obj
    while scope is not None:
        if head in scope.members:
            member = scope.members[head]
            base = member.target_path if member.is_alias else member.path  # an import: where it lives
            return f"{base}.{rest}" if rest else base
        scope = scope.parent
    try:
        base = obj.resolve(head)
    except Exception:  # noqa: BLE001 - unresolvable names stay as they are
        return target
    return f"{base}.{rest}" if rest else base


def _rewrite(obj: griffe.Object) -> None:
    doc = obj.docstring
    if doc is None:
        return

    def role(match: re.Match) -> str:
        kind, target = match.group(1), match.group(2)
        ident = _resolve(obj, target)
        # a full path reads as its last name (the link and its tooltip give the rest), a module as itself
        short = target.startswith("fla_gsa.") and kind != "mod"
        label = html.escape(target.rsplit(".", 1)[-1] if short else target)
        return f'<autoref identifier="{html.escape(ident)}" optional><code>{label}</code></autoref>'

    value = ROLE.sub(role, doc.value)
    value = LITERAL_MARKER.sub(":", value)
    value = EXAMPLE_TITLE.sub(r"\1Examples:", value)
    doc.value = _split_grouped_items(value)


class RstRoles(griffe.Extension):
    """Rewrite every docstring of the loaded package once it is complete."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()

        def walk(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            _rewrite(obj)
            for member in obj.members.values():
                if not member.is_alias:
                    walk(member)

        walk(pkg)
