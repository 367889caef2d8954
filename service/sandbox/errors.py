"""Toss-shaped error responses: ``{"code", "message"}`` with the status from the code table."""

from __future__ import annotations

import json

from starlette.responses import Response

from service.toss import ERROR_CODES


class ApiError(Exception):
    """Raised anywhere in the sandbox to answer with a Toss error body."""

    def __init__(self, code: str, message: str | None = None, status: int | None = None) -> None:
        spec = ERROR_CODES.get(code)
        # Codes outside the table (e.g. an arbitrary TossPayments-Test-Code) default to 400.
        self.code = code
        self.status = status if status is not None else (spec.http_status if spec else 400)
        self.message = message if message is not None else (spec.message if spec else code)
        super().__init__(f"{self.status} {code}")

    def response(self) -> Response:
        return json_response({"code": self.code, "message": self.message}, self.status)


def json_bytes(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_response(payload: object, status: int = 200) -> Response:
    return Response(json_bytes(payload), status_code=status, media_type="application/json")
