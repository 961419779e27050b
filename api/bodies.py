"""Every request and response body of the API, declared once.

Each declaration is a msgspec Struct. From it come the validation of what clients send
(`decode`), the rendering of what the API answers (`json_response`), and the schemas of the
OpenAPI document (api/openapi.py). A rule msgspec's types cannot hold (an amount's
exactness) is checked in the declaration's `__post_init__`, and stated beside it for the
document (`AMOUNT_SCHEMA`). A second spelling of a field that the API accepts is an alias
(`aliases`), renamed before decoding and named only in the body's description, so that
the document declares one typed body.
"""

from __future__ import annotations

import enum
import re
import uuid
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec
from aiohttp import web
from msgspec import UNSET, Meta, Struct, UnsetType

from shared.codec import (
    HOLD_KINDS,
    OPERATION_TYPES,
    TRANSFER_LEGS,
)
from shared.errors import InvalidInput
from shared.money import AMOUNT_SCHEMA, MONEY_PATTERN, parse_amount, whole_number
from shared.settings import Settings

Uuid = Annotated[str, Meta(extra_json_schema={"format": "uuid"})]
Time = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
Money = Annotated[
    str,
    Meta(
        pattern=MONEY_PATTERN,
        description="Exact money: a decimal string with two fraction digits",
        examples=["1000.00"],
    ),
]


class OperationType(enum.StrEnum):
    """A deposit or a withdrawal: an enum of its own, so that the document names it once."""

    DEPOSIT = "DEPOSIT"
    WITHDRAW = "WITHDRAW"


assert tuple(map(str, OperationType)) == OPERATION_TYPES
# Every kind the ledger holds, in one enum (a union of two is two types to generators).
LedgerKind = Literal[
    "DEPOSIT",
    "WITHDRAW",
    "TRANSFER_OUT",
    "TRANSFER_IN",
    "TRANSFER_RETURN",
    "HOLD",
    "HOLD_CAPTURE",
    "HOLD_VOID",
    "HOLD_EXPIRE",
]
assert LedgerKind.__args__ == OPERATION_TYPES + TRANSFER_LEGS + HOLD_KINDS  # type: ignore[attr-defined]
Amount = Annotated[Any, Meta(extra_json_schema=AMOUNT_SCHEMA)]
USERNAME_PATTERN = "^[A-Za-z0-9_.-]{3,64}$"
PASSWORD_LENGTH = (10, 256)


class Body(Struct, forbid_unknown_fields=True):
    """A body of the API: a JSON object with exactly the fields declared."""


class OperationRequest(Body, kw_only=True):
    """A deposit to or a withdrawal from the wallet. `operation_type` is accepted in place of
    `operationType` (one of the two, not both)."""

    # After decoding, `amount` is in minor units.

    operationType: OperationType
    amount: Amount

    # Accepted, and left out of the document: a body declared with two spellings of one
    # required field is a union to client generators, which then cannot type it.
    aliases: ClassVar[dict[str, str]] = {"operation_type": "operationType"}

    def __post_init__(self) -> None:
        self.amount = parse_amount(self.amount)

    @property
    def kind(self) -> str:
        return self.operationType.value


class OperationFormRequest(OperationRequest, kw_only=True):
    """The original form of the operation request: the wallet id travels in the body.
    `operation_type` is accepted in place of `operationType` (one of the two, not both)."""

    walletId: uuid.UUID


class Credentials(Body):
    username: Annotated[str, Meta(pattern=USERNAME_PATTERN)]
    password: Annotated[str, Meta(min_length=PASSWORD_LENGTH[0], max_length=PASSWORD_LENGTH[1])]


class RefreshToken(Body):
    refresh_token: str


class Wallet(Body):
    id: Uuid
    balance: Money
    held: Annotated[Money, Meta(description="What the wallet's holds reserve of the balance")]
    available: Annotated[
        Money, Meta(description="balance - held: what may be withdrawn, transferred or held")
    ]
    created_at: Time
    updated_at: Time


class WalletPage(Body):
    items: list[Wallet]
    next_cursor: Annotated[str | None, Meta(description="The cursor of the next page")]


class Operation(Body):
    """An operation and its outcome, as the ledger holds it. A transfer's leg names the
    transfer and the other wallet: TRANSFER_OUT debits the source, TRANSFER_IN credits the
    destination, TRANSFER_RETURN credits the source back when the destination could not
    take it."""

    id: Uuid
    wallet_id: Uuid
    operation_type: LedgerKind
    amount: Money
    status: Literal["applied", "rejected"]
    reason: Literal["insufficient_funds", "balance_limit"] | None
    balance: Annotated[Money, Meta(description="The wallet's balance after this operation")]
    seq: Annotated[int, Meta(ge=1, description="Its place in the wallet's ledger")]
    created_at: Time
    transfer_id: Annotated[Uuid | None, Meta(description="The transfer of a leg")] = None
    counterparty: Annotated[
        Uuid | None, Meta(description="A leg's other wallet: the destination of a debit")
    ] = None
    hold_id: Annotated[Uuid | None, Meta(description="The hold of a HOLD_* row")] = None
    available: Annotated[
        Money | None, Meta(description="The wallet's available funds after this operation")
    ] = None


class TransferRequest(Body):
    """Moves an amount from one wallet to another."""

    from_: Annotated[uuid.UUID, Meta(description="The wallet debited")] = msgspec.field(name="from")
    to: Annotated[uuid.UUID, Meta(description="The wallet credited")]
    amount: Amount

    def __post_init__(self) -> None:
        self.amount = parse_amount(self.amount)
        if self.from_ == self.to:
            raise InvalidInput("to", "must be another wallet than from")


TransferStatus = Literal["pending", "in_flight", "completed", "rejected"]


class Transfer(Body):
    """A transfer and where it stands: `pending` (queued, nothing moved), `in_flight`
    (debited from the source, not yet credited to the destination), `completed`, or
    `rejected` (nothing moved: refused, or credited back to the source)."""

    id: Uuid
    from_: Uuid = msgspec.field(name="from")
    to: Uuid
    amount: Money
    status: TransferStatus
    reason: Literal["insufficient_funds", "balance_limit", "wallet_not_found"] | None
    balance: Annotated[
        Money | None,
        Meta(description="The source's balance after the transfer (null while pending)"),
    ]
    created_at: Annotated[Time | None, Meta(description="When the source was debited")]
    href: str


class HoldRequest(Body):
    """Reserves an amount of the wallet's available funds until captured, voided or expired."""

    amount: Amount
    expires_in: Annotated[
        Any,
        Meta(
            extra_json_schema={
                "type": "integer",
                "minimum": 1,
                "maximum": Settings.hold_expires_max,
                "description": "Seconds until it expires by itself (HOLD_EXPIRES_DEFAULT if "
                "left out; at most HOLD_EXPIRES_MAX, by default the maximum shown)",
            }
        ),
    ] = UNSET

    def __post_init__(self) -> None:
        self.amount = parse_amount(self.amount)
        if self.expires_in is not UNSET:
            self.expires_in = whole_number("expires_in", self.expires_in, least=1)


class CaptureRequest(Body):
    """Captures the hold: `amount` (at most the held amount; all of it if left out) leaves
    the wallet, paid to the wallet `to` if given; the rest is released."""

    amount: Amount | UnsetType = UNSET
    to: Annotated[uuid.UUID | UnsetType, Meta(description="The wallet paid")] = UNSET

    def __post_init__(self) -> None:
        if self.amount is not UNSET:
            self.amount = parse_amount(self.amount)


class Hold(Body):
    """A hold and how it stands: `held` (reserved), then once `captured`, `voided` or
    `expired`; `balance` and `available` are its wallet's now."""

    id: Uuid
    wallet_id: Uuid
    amount: Money
    status: Literal["held", "captured", "voided", "expired"]
    captured: Annotated[Money | None, Meta(description="What a capture took")]
    expires_at: Time
    created_at: Time
    updated_at: Time
    balance: Money
    available: Money
    to: Annotated[Uuid | None, Meta(description="The wallet a capture paid")] = None
    transfer_id: Annotated[Uuid | None, Meta(description="The transfer that pays it")] = None
    transfer_status: TransferStatus | None = None
    href: str = ""


class HoldPage(Body):
    items: list[Hold]
    next_cursor: Annotated[str | None, Meta(description="The cursor of the next page")]


class OperationPage(Body):
    items: list[Operation]
    next_cursor: Annotated[str | None, Meta(description="The cursor of the next page")]


class Pending(Body):
    """Queued and not yet applied: `href` shows the outcome once it is."""

    id: Uuid
    wallet_id: Uuid
    status: Literal["pending"]
    href: str


class FieldError(Body):
    field: str
    reason: str


class Problem(Body, omit_defaults=True):
    """RFC 9457; `type` is stable per kind of error."""

    type: Annotated[str, Meta(pattern="^urn:wallet-service:problem:")]
    title: str
    status: int
    detail: str | UnsetType = UNSET
    errors: list[FieldError] | UnsetType = UNSET
    operation: Operation | UnsetType = UNSET
    operation_id: Uuid | UnsetType = UNSET
    transfer: Transfer | UnsetType = UNSET
    transfer_id: Uuid | UnsetType = UNSET
    hold: Hold | UnsetType = UNSET
    checks: dict[str, str] | UnsetType = UNSET


class User(Body):
    id: Uuid
    username: str
    created_at: Time


class Tokens(Body):
    token_type: Literal["Bearer"]
    access_token: str
    expires_in: Annotated[int, Meta(description="Seconds")]
    refresh_token: Annotated[str, Meta(description="Use once, at token/refresh")]
    refresh_expires_in: Annotated[int, Meta(description="Seconds")]


class LiveSecond(Body):
    t: Annotated[int, Meta(description="Unix time, seconds")]
    answered: int
    p50_ms: float | None
    p99_ms: float | None
    committed: int
    mean_batch: float | None
    queued: int | None
    queued_by_shard: dict[str, int] | None


class Live(Body):
    window_seconds: int
    shard_count: int
    series: list[LiveSecond]
    computed_at: Annotated[
        float, Meta(description="Unix time the view was computed (at most once a second)")
    ]


class Health(Body):
    status: Literal["ok"]


class Ready(Body):
    status: Literal["ready"]
    checks: dict[str, str]


BODIES: tuple[type[Body], ...] = (
    OperationRequest,
    OperationFormRequest,
    Credentials,
    RefreshToken,
    Wallet,
    WalletPage,
    Operation,
    OperationPage,
    Pending,
    TransferRequest,
    Transfer,
    HoldRequest,
    CaptureRequest,
    Hold,
    HoldPage,
    Problem,
    User,
    Tokens,
    Live,
    Health,
    Ready,
)

_FIELD_NAMED = re.compile(r"(unknown|missing required) field `([^`]+)`")
_AT_FIELD = re.compile(r"^(.*) - at `\$\.([A-Za-z_]+)")


Declared = TypeVar("Declared", bound=Body)


def decode(data: dict[str, Any], body: type[Declared]) -> Declared:
    """`data` (a JSON object, numbers as Decimal) as the declared body, or InvalidInput
    naming the first field at fault."""
    aliases: dict[str, str] = getattr(body, "aliases", {})
    if aliases:
        data = _unalias(data, aliases)
    try:
        return msgspec.convert(data, body)
    except msgspec.ValidationError as e:
        raise _invalid(str(e)) from None


def _invalid(message: str) -> InvalidInput:
    named = _FIELD_NAMED.search(message)
    if named:
        reason = "is not a known field" if named[1] == "unknown" else "is required"
        return InvalidInput(named[2], reason)
    at = _AT_FIELD.match(message)
    if at:
        reason = at[1].replace("`", "").replace("Expected", "must be")
        return InvalidInput(at[2], reason[0].lower() + reason[1:])
    return InvalidInput("body", message)


def _unalias(data: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    """`data` with each accepted alias renamed to the field it spells."""
    for alias, name in aliases.items():
        if alias in data:
            if name in data:
                raise InvalidInput(name, f"give {name} or {alias}, not both")
            data = {(name if key == alias else key): value for key, value in data.items()}
    return data


def json_response(
    body: Body, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body),
        status=status,
        content_type="application/json",
        headers=headers,
    )
