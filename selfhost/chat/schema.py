"""--schema FILE: constrain a reply to a JSON schema (llama.cpp grammar) and validate the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from selfhost.errors import DependencyError, NotFoundError, UsageError


class SchemaCheck(BaseModel):
    valid: bool
    data: Any = None  # the parsed reply when valid
    error: str | None = None


def load_schema(path: Path) -> dict[str, Any]:
    """Read and check a JSON schema file. Raises NotFoundError / UsageError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no such schema file: {path}")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise UsageError(f"{path} is not a JSON schema (expected an object, got {type(schema).__name__})")
    validator = _validator_class(schema)
    try:
        validator.check_schema(schema)
    except Exception as exc:  # jsonschema.SchemaError
        raise UsageError(f"{path} is not a valid JSON schema: {getattr(exc, 'message', exc)}") from exc
    return schema


def grammar_for(schema: dict[str, Any]) -> str:
    """GBNF text (root rule "root") that only admits JSON matching `schema`: llama.cpp's own converter."""
    from selfhost.runtime.llama_backend import llama

    llama()
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises assorted errors on schemas it cannot express
        raise UsageError(
            f"the schema cannot be turned into a llama.cpp grammar: {type(exc).__name__}: {exc}"
        ) from exc


def check_reply(text: str, schema: dict[str, Any]) -> SchemaCheck:
    """Parse a reply as JSON and validate it against the schema."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return SchemaCheck(valid=False, error=f"the reply is not valid JSON ({exc})")
    errors = sorted(_validator_class(schema)(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.path) or "(root)"
        return SchemaCheck(
            valid=False, data=data, error=f"the reply does not match the schema at {where}: {first.message}"
        )
    return SchemaCheck(valid=True, data=data)


def _validator_class(schema: dict[str, Any]) -> Any:
    try:
        import jsonschema
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DependencyError("--schema needs the jsonschema package", hint="pip install jsonschema") from exc
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
