"""What a task's args mean to its handler, for the Idempotency-Key rule: the args
schema's defaults filled in where the API can tell which apply, and numbers by value
(the handler's model reads ``1.0`` and ``1`` alike). Pure."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# orjson reads an integer literal in this range as an int, and any other as a float: an
# integral float in it is the int a client could have sent, one outside it is not.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# A schema's $refs can point at one another without end; no model needs this many.
_MAX_REF_HOPS = 32


def by_value(value: Any) -> Any:
    """``value`` with every integral float that an int could spell as that int."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and _INT_MIN <= value <= _INT_MAX else value
    if isinstance(value, dict):
        return {k: by_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [by_value(v) for v in value]
    return value


def with_defaults(schema: Mapping[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """``args`` (already valid against ``schema``) with the defaults the schema gives the
    properties it left out, in nested objects too. Where the schema does not tell which
    subschema a value follows (a union of objects, say), that value is left as sent."""
    filled = _fill(schema, args, schema)
    return filled if isinstance(filled, dict) else args


def _fill(schema: Any, value: Any, root: Mapping[str, Any]) -> Any:
    if isinstance(value, dict):
        shape = _object_schema(schema, root)
        if shape is None:
            return value
        props = shape.get("properties")
        props = props if isinstance(props, dict) else {}
        out = dict(value)
        for name, prop in props.items():
            if name in out:
                out[name] = _fill(prop, out[name], root)
            elif (default := _default(prop, root)) is not None:
                # As is: a model does not validate its defaults (nor may a default that
                # holds itself be walked).
                out[name] = copy.deepcopy(default[0])
        extra = shape.get("additionalProperties")  # dict[str, Model]
        if isinstance(extra, dict):
            for name in out.keys() - props.keys():
                out[name] = _fill(extra, out[name], root)
        return out
    if isinstance(value, list):
        items = _resolve(schema, root).get("items")
        if isinstance(items, dict):
            return [_fill(items, item, root) for item in value]
    return value


def _resolve(schema: Any, root: Mapping[str, Any]) -> Mapping[str, Any]:
    """The subschema behind local ``$ref``s and a one-item ``allOf`` (pydantic's two ways
    of naming a model); ``{}`` (nothing known) for anything else."""
    for _ in range(_MAX_REF_HOPS):
        if not isinstance(schema, dict):
            return {}
        ref = schema.get("$ref")
        all_of = schema.get("allOf")
        if isinstance(ref, str):
            schema = _local(ref, root)
        elif isinstance(all_of, list) and len(all_of) == 1 and "properties" not in schema:
            schema = all_of[0]
        else:
            return schema
    return {}


def _local(ref: str, root: Mapping[str, Any]) -> Any:
    """The subschema a ``#/...`` pointer names in ``root``, else None."""
    if not ref.startswith("#"):
        return None
    node: Any = root
    for escaped in ref[1:].split("/")[1:]:
        part = escaped.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _object_schema(schema: Any, root: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The schema an object value follows: ``schema`` itself, or the one branch of its
    ``anyOf``/``oneOf`` that takes objects (``Model | None``); None if several do."""
    resolved = _resolve(schema, root)
    branches = resolved.get("anyOf", resolved.get("oneOf"))
    if _takes_objects(resolved) or not isinstance(branches, list):
        return resolved
    objects = [b for b in (_resolve(s, root) for s in branches) if _takes_objects(b)]
    return objects[0] if len(objects) == 1 else None


def _takes_objects(schema: Mapping[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "object" or (
        kind is None and ("properties" in schema or "additionalProperties" in schema)
    )


def _default(prop: Any, root: Mapping[str, Any]) -> tuple[Any] | None:
    """A property's default, as a 1-tuple (a default may be null), else None. Beside a
    ``$ref`` (pydantic puts it there) or in the subschema it names."""
    if isinstance(prop, dict) and "default" in prop:
        return (prop["default"],)
    resolved = _resolve(prop, root)
    return (resolved["default"],) if "default" in resolved else None
