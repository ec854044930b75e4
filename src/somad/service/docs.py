"""The ``/docs`` page: the service's OpenAPI description as one self-contained HTML page (no script or style from
the internet: FastAPI's own page loads Swagger UI from a CDN and is blank on an offline line PC), with a form that
sends an image to ``POST /v1/predict`` and shows the answer."""

from __future__ import annotations

import functools

#: HTTP methods in the order the page lists them.
_METHODS = ("get", "post", "put", "delete")


def _type(schema: dict, components: dict) -> str:
    """A short human-readable type of a JSON schema."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " or ".join(_type(s, components) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    if "const" in schema:
        return repr(schema["const"])
    if schema.get("type") == "array":
        return f"list of {_type(schema.get('items', {}), components)}"
    return str(schema.get("type", "any"))


def _fields(schema: dict, components: dict, prefix: str = "") -> list[dict]:
    """The fields of an object schema (``$ref`` followed), nested objects' fields listed as ``outer.inner``."""
    while "$ref" in schema:
        schema = components.get(schema["$ref"].rsplit("/", 1)[-1], {})
    rows = []
    for name, sub in schema.get("properties", {}).items():
        rows.append({"name": prefix + name, "type": _type(sub, components), "description": sub.get("description", "")})
        target = sub
        if sub.get("type") == "array":
            target = sub.get("items", {})
        elif "anyOf" in sub:
            target = next((s for s in sub["anyOf"] if s.get("type") != "null"), {})
            if target.get("type") == "array":
                target = target.get("items", {})
        if "$ref" in target:
            rows += _fields(target, components, prefix=f"{prefix}{name}.")
    return rows


def operations(openapi: dict) -> list[dict]:
    """The page's view data: one entry per operation of ``openapi`` (an OpenAPI 3 description), in path order."""
    components = openapi.get("components", {}).get("schemas", {})
    ops = []
    for path, item in openapi.get("paths", {}).items():
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            body = op.get("requestBody")
            responses = []
            for status, answer in sorted(op.get("responses", {}).items()):
                schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
                fields = _fields(schema, components) if status.startswith("2") else []
                responses.append({"status": status, "description": answer.get("description", ""), "fields": fields})
            ops.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "anchor": f"{method}-{path.strip('/').replace('/', '-') or 'root'}",
                    "summary": op.get("description") or op.get("summary") or "",
                    "parameters": [
                        {
                            "name": p["name"],
                            "type": _type(p.get("schema", {}), components),
                            "description": p.get("description") or p.get("schema", {}).get("description", ""),
                        }
                        for p in op.get("parameters", [])
                    ],
                    "body": body
                    and {"description": body.get("description", ""), "types": list(body.get("content", {}))},
                    "responses": responses,
                }
            )
    return ops


@functools.cache
def _template():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("somad.service", "templates"), autoescape=select_autoescape(["j2"]))
    return env.get_template("docs.html.j2")


def render(openapi: dict, *, openapi_url: str = "/openapi.json", predict_url: str = "/v1/predict") -> str:
    """The page for ``openapi``."""
    info = openapi.get("info", {})
    return _template().render(
        title=info.get("title", "API"),
        version=info.get("version", ""),
        operations=operations(openapi),
        openapi_url=openapi_url,
        predict_url=predict_url,
    )
