"""``--help`` of the training command: every key of the schema with its docstring and the value
this command would use (no torch: the command line stays fast).

The field docstrings are the string literals after each field of the schema's dataclasses
(``stability/config.py`` and the section modules it names), read with :mod:`ast`; Hydra's help
template (``stability/conf/hydra/help/stability.yaml``) calls :func:`keys_help` through the
``${stability_help:}`` resolver with the composed config, so the values shown are those of the
recipe, size and overrides on the same command line (``stability-train recipe=gpt --help``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
from collections.abc import Iterator
from typing import Any

WIDTH = 100
"""Wrap docstrings to this many columns."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal after the field), for one dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def section_of(f: dataclasses.Field) -> type | None:
    """The dataclass of a nested section field, or None for a plain value (``detectors.params``
    is an open dict: any detector name)."""
    if f.default_factory is dataclasses.MISSING:
        return None
    default = f.default_factory()
    return type(default) if dataclasses.is_dataclass(default) else None


def keys(schema: type, prefix: str = "") -> Iterator[tuple[str, str, type | None]]:
    """``(dotted key, docstring, section class or None)`` for every field, depth first; a
    section comes before its keys, with its class docstring."""
    docs = field_docs(schema)
    for f in dataclasses.fields(schema):
        section = section_of(f)
        key = prefix + f.name
        if section is not None:
            yield key, inspect.cleandoc(section.__doc__ or ""), section
            yield from keys(section, key + ".")
        else:
            yield key, docs.get(f.name, ""), None


def _value(root: Any, key: str) -> str:
    """The value of ``key`` in the composed config, as one would type it on the command line."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(root, key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
    except Exception:  # an interpolation that cannot resolve here: show it as written
        return str(OmegaConf.select(root, key, throw_on_resolution_failure=False))
    return value if isinstance(value, str) else json.dumps(value)


def keys_help(schema: type, root: Any = None) -> str:
    """The ``Keys`` part of ``--help``: ``key = value`` and the docstring, indented, for every
    key of ``schema``, grouped by section; the values are ``root``'s (the composed config).
    ``$`` is doubled (Hydra fills the help template with :class:`string.Template`)."""
    lines = []
    for key, doc, section in keys(schema):
        if section is not None:
            lines += ["", f"{key}: {doc.splitlines()[0] if doc else ''}"]
            continue
        indent = "  " * key.count(".")
        value = _value(root, key) if root is not None else ""
        lines.append(f"{indent}{key} = {value}")
        for paragraph in doc.split("\n"):
            lines += textwrap.wrap(paragraph, WIDTH, initial_indent=indent + "    ",
                                   subsequent_indent=indent + "    ") or []
    return "\n".join(lines).replace("$", "$$")


def register(schema: type) -> None:
    """The ``${stability_help:}`` resolver of the help template, for the root dataclass
    ``schema`` (``stability.config.Config``; this module imports no part of the project)."""
    from omegaconf import OmegaConf

    def resolver(*, _root_: Any) -> str:
        return keys_help(schema, _root_)

    if not OmegaConf.has_resolver("stability_help"):
        OmegaConf.register_new_resolver("stability_help", resolver)
