from __future__ import annotations

from decimal import Decimal

import pytest

from shared.errors import InvalidInput
from shared.money import MAX_AMOUNT_MINOR, format_minor, parse_amount


@pytest.mark.parametrize(
    ("given", "minor"),
    [
        (Decimal(1000), 100_000),
        (Decimal("10.25"), 1025),
        ("10.25", 1025),
        ("0.01", 1),
        ("7", 700),
        ("00001.5", 150),
        ("999999999.99", MAX_AMOUNT_MINOR - 1),
        ("1000000000", MAX_AMOUNT_MINOR),
        (Decimal("1E+3"), 100_000),
        (Decimal("1.5E+1"), 1500),
        (Decimal("1000000000.00"), MAX_AMOUNT_MINOR),
    ],
)
def test_amounts_parse_exactly(given: object, minor: int) -> None:
    assert parse_amount(given) == minor


@pytest.mark.parametrize(
    "given",
    [
        True,
        1.5,
        None,
        [],
        {},
        "",
        " 1",
        "1e3",
        "-1",
        "+1",
        "1.",
        ".5",
        "1.005",
        "NaN",
        "0.00",
        Decimal(0),
        Decimal("-0"),
        Decimal(-1),
        Decimal("NaN"),
        Decimal("Infinity"),
        Decimal("1.005"),
        Decimal("1.000"),
        Decimal("1E+400"),
        Decimal("1E-400"),
        Decimal("1000000000.01"),
        "1000000000.01",
        "0",
        "1" * 21,
    ],
)
def test_inexact_or_out_of_range_amounts_are_refused(given: object) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_amount(given)
    assert refused.value.field == "amount"


@pytest.mark.parametrize(
    ("minor", "text"),
    [
        (0, "0.00"),
        (1, "0.01"),
        (1025, "10.25"),
        (-250, "-2.50"),
        (2**63 - 1, "92233720368547758.07"),
    ],
)
def test_formatting(minor: int, text: str) -> None:
    assert format_minor(minor) == text
