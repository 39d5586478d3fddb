"""OpenAI-style errors and strict reading of request bodies.

Every error the server returns has the shape OpenAI's API uses::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}

so that the ``openai`` client raises its usual exception classes with our message.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

from fastapi.responses import JSONResponse

from portaserve.core.sampling_params import InvalidRequest, lax_int


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_invalid(e: InvalidRequest, prefix: str = "") -> APIError:
    return APIError(400, prefix + str(e), "invalid_request_error", getattr(e, "param", None),
                    getattr(e, "code", None))


async def read_json_object(request) -> dict:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start}: "
                          f"{raw[e.start:e.start + 1]!r})", None, "invalid_encoding")
    if not text.strip():
        raise bad_request("the request body is empty; send a JSON object", None, "invalid_json")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}", None, "invalid_json")
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits; arrays nested too deep
        raise bad_request(f"the request body cannot be read: {str(e) or type(e).__name__}"[:300],
                          None, "invalid_json")
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}",
                          None, "invalid_json")
    if _ESCAPED_SURROGATE.search(text):  # the only way UTF-8 text can carry a lone surrogate
        _check_unicode(obj)
    return obj


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(obj: dict) -> None:
    """A JSON escape may encode half of a surrogate pair (\\ud800), which is no Unicode text:
    a 400 naming the top-level field, before a tokenizer meets it."""
    for field, value in obj.items():
        stack = [field, value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    name = field if isinstance(field, str) and field.isprintable() else None
                    raise bad_request(f"{'field ' + repr(name) if name else 'a field name'} holds a lone "
                                      f"surrogate ({v[e.start]!r} at character {e.start}), which is not "
                                      "valid Unicode text", name, "invalid_encoding")
            elif isinstance(v, dict):
                stack.extend(v)
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(x for x in v if isinstance(x, (str, dict, list)))


# ---- typed field access ------------------------------------------------------------------
_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "an array", dict: "an object"}


def get(body: dict, name: str, typ, default: Any = None, *, nullable: bool = True):
    """body[name] checked against typ (a type or tuple); ints are accepted as floats,
    booleans are never numbers."""
    if name not in body or (body[name] is None and nullable):
        return default
    v = body[name]
    types = typ if isinstance(typ, tuple) else (typ,)
    ok = False
    for t in types:
        if t is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            ok = True
        elif t is int and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        elif t not in (int, float) and isinstance(v, t):
            ok = True
    # as lax as pydantic, which SGLang and vLLM validate with: 16.0 is an integer, 0 and 1
    # are booleans
    if not ok and int in types and type(lax_int(v)) is int:
        v, ok = lax_int(v), True
    elif not ok and bool in types and type(v) is int and v in (0, 1):
        v, ok = bool(v), True
    if not ok:
        want = " or ".join(_NAMES.get(t, t.__name__) for t in types)
        raise bad_request(f"{name} must be {want}, got {json.dumps(v)[:60]}", name)
    if isinstance(v, float) and not math.isfinite(v):
        raise bad_request(f"{name} must be a finite number, got {v}", name)
    return v


def refuse_unsupported(body: dict, fields: dict) -> None:
    """400 for the first of fields (name -> why) the body sets to something other than an
    empty value: a field the server knows but cannot honour is refused, not ignored."""
    for name, why in fields.items():
        if body.get(name) not in (None, False, "", [], {}):
            raise bad_request(why, name)
