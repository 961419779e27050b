"""Amounts: the one place that knows about decimals.

Inside, money is an integer number of minor units (cents). Outside, it is a decimal string
with two fraction digits. Input is taken as a JSON number (parsed to Decimal, never float)
or a decimal string, and refused rather than rounded when it is not exact.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from shared.errors import InvalidInput

MINOR_PER_MAJOR = 100
FRACTION_DIGITS = 2
# The largest single operation: 1,000,000,000.00.
MAX_AMOUNT_MINOR = 1_000_000_000 * MINOR_PER_MAJOR
# A balance is a PostgreSQL BIGINT of minor units.
MAX_BALANCE_MINOR = 2**63 - 1

MAX_AMOUNT_MAJOR = MAX_AMOUNT_MINOR // MINOR_PER_MAJOR
assert str(MAX_AMOUNT_MAJOR).rstrip("0") == "1", "the pattern below needs a power of ten"
# A decimal string amount: more than 0, at most the maximum, at most two decimals. The
# parser and the API's document both use it.
AMOUNT_PATTERN = (
    r"^0*(0\.(0[1-9]|[1-9][0-9]?)"
    rf"|[1-9][0-9]{{0,{len(str(MAX_AMOUNT_MAJOR)) - 2}}}(\.[0-9]{{1,2}})?"
    rf"|{MAX_AMOUNT_MAJOR}(\.00?)?)$"
)
# An amount the API answers with: two fraction digits, always.
MONEY_PATTERN = r"^-?[0-9]+\.[0-9]{2}$"
AMOUNT_SCHEMA = {
    "oneOf": [
        {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": MAX_AMOUNT_MAJOR,
            "multipleOf": 1 / MINOR_PER_MAJOR,
        },
        {"type": "string", "pattern": AMOUNT_PATTERN},
    ],
    "description": f"More than 0, at most {MAX_AMOUNT_MAJOR}.00, at most {FRACTION_DIGITS} "
    "fraction digits: a JSON number (read exactly, never as a float) or a decimal string",
    "examples": [1000, "10.25"],
}
_AMOUNT_STRING = re.compile(AMOUNT_PATTERN)


def parse_amount(value: object, field: str = "amount") -> int:
    """A client's amount in minor units; raises InvalidInput naming the field and the reason."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise InvalidInput(field, "must be a number or a decimal string")
    if isinstance(value, str):
        if not _AMOUNT_STRING.fullmatch(value):
            raise InvalidInput(
                field,
                f'must be a decimal string like "10.25": digits, at most {FRACTION_DIGITS} '
                f"decimals, more than 0 and at most {format_minor(MAX_AMOUNT_MINOR)}",
            )
        major, _, cents = value.partition(".")
        return int(major) * MINOR_PER_MAJOR + int(cents.ljust(2, "0"))
    amount = Decimal(value)
    if not amount.is_finite():
        raise InvalidInput(field, "must be a finite number")
    exponent = amount.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent < -FRACTION_DIGITS and amount > 0:
        raise InvalidInput(field, f"must have at most {FRACTION_DIGITS} decimal places")
    if amount > Decimal(MAX_AMOUNT_MINOR) / MINOR_PER_MAJOR:  # before making a huge int
        raise InvalidInput(field, f"must be at most {format_minor(MAX_AMOUNT_MINOR)}")
    return _checked(field, int(amount.scaleb(FRACTION_DIGITS)))


def _checked(field: str, minor: int) -> int:
    if minor <= 0:
        raise InvalidInput(field, "must be greater than 0")
    if minor > MAX_AMOUNT_MINOR:
        raise InvalidInput(field, f"must be at most {format_minor(MAX_AMOUNT_MINOR)}")
    return minor


def format_minor(minor: int) -> str:
    """1025 -> "10.25"."""
    sign = "-" if minor < 0 else ""
    major, cents = divmod(abs(minor), MINOR_PER_MAJOR)
    return f"{sign}{major}.{cents:02d}"


def whole_number(field: str, value: Any, least: int) -> int:
    """A JSON number as the API reads it (a Decimal) that is whole, as an int."""
    if not isinstance(value, Decimal) or value != value.to_integral_value():
        raise InvalidInput(field, "must be a whole number")
    if value < least:
        raise InvalidInput(field, f"must be at least {least}")
    return int(value)
