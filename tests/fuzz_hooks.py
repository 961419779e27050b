"""Schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

An Idempotency-Key sent again with another request is refused with 422 by design: that is
state, not the validity of the request. A key the run already sent with another request is
replaced by a fresh one, so that the positive-data check judges each request on its own.

A transfer from a wallet to itself is refused with 422 too, a rule JSON Schema cannot state
(two fields that must differ): such a generated case gets another destination. So is a
capture above what its hold holds, which the document cannot know: a generated capture
takes the least amount, 0.01, which every hold holds.
"""

from __future__ import annotations

import uuid
from typing import Any

import schemathesis

KEY = "Idempotency-Key"
sent: dict[str, str] = {}


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    body = case.body
    if isinstance(body, dict) and "from" in body and body.get("to") == body["from"]:
        body["to"] = str(uuid.uuid4())
    if isinstance(body, dict) and case.path.endswith("/capture") and "amount" in body:
        body["amount"] = "0.01"
    key = (case.headers or {}).get(KEY)
    if key is None:
        return
    request = repr((case.method, case.formatted_path, case.body))
    if sent.setdefault(key, request) != request:
        case.headers[KEY] = str(uuid.uuid4())
