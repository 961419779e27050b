"""The ids of operations and transfers: what a client's Idempotency-Key becomes, and the
ids of a transfer's steps.

Each kind of id comes from a namespace of its own (UUIDv5), so the ids a client's keys
become and the ids the service gives a transfer's steps never meet: a client can compute
every id here, but no key it sends becomes one of the service's own ids, or another key's.
A key is taken byte for byte: two spellings of one UUID are two keys.
"""

from __future__ import annotations

import uuid

# A client's Idempotency-Key -> its operation's id (on the wallet it names).
CLIENT_KEYS = uuid.UUID("5b0c4a52-8f0e-4f3e-9a51-3b2d8c1f7e60")
# A transfer's debit and credit are recorded under the transfer's id (on two wallets), the
# return under an id derived from it.
TRANSFER_IDS = uuid.UUID("5f0c3e0e-6a3b-4d52-9d8f-2f4f7a1c0b21")
RETURN_IDS = uuid.UUID("0b7d1c64-0f55-4f0e-8a7e-6f3d2a9c5e10")


def client_operation_id(idempotency_key: str) -> str:
    """The id of the operation a client sends under `idempotency_key`."""
    return str(uuid.uuid5(CLIENT_KEYS, idempotency_key))


def transfer_id_for(source_id: str, idempotency_key: str | None) -> str:
    """A new transfer's id: derived from the source and the client's Idempotency-Key, so a
    retry is the same transfer and two wallets' keys never meet; else a fresh one."""
    if idempotency_key is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(TRANSFER_IDS, f"{source_id}/{idempotency_key}"))


def return_op_id(transfer_id: str) -> str:
    """The id of the credit that brings a transfer's amount back to its source."""
    return str(uuid.uuid5(RETURN_IDS, transfer_id))


# A hold is recorded under its id on its wallet; what ends it under an id derived from the
# hold and the client's key (a capture or a void), or from the hold alone (its expiry, and
# the transfer a capture paid to a wallet starts: one capture per hold).
HOLD_IDS = uuid.UUID("9d3c6b1e-2a47-4f0b-8c5e-71a0d4e2f3b8")
HOLD_STEP_IDS = uuid.UUID("c2a91f5d-6e38-4b7a-9f04-5d8e1b3a7c62")
EXPIRY_IDS = uuid.UUID("4e8b2d71-93c5-4a06-b1f7-0c6d9e2a5b34")
CAPTURE_TRANSFER_IDS = uuid.UUID("7a15e9c3-d04b-4e82-a6f1-38b2c7d05e96")


def hold_id_for(wallet_id: str, idempotency_key: str | None) -> str:
    """A new hold's id, as transfer_id_for makes a transfer's."""
    if idempotency_key is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(HOLD_IDS, f"{wallet_id}/{idempotency_key}"))


def hold_step_id(hold_id: str, idempotency_key: str | None) -> str:
    """The id of a capture or void of the hold a client sends under `idempotency_key`."""
    if idempotency_key is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(HOLD_STEP_IDS, f"{hold_id}/{idempotency_key}"))


def expiry_op_id(hold_id: str) -> str:
    return str(uuid.uuid5(EXPIRY_IDS, hold_id))


def capture_transfer_id(hold_id: str) -> str:
    return str(uuid.uuid5(CAPTURE_TRANSFER_IDS, hold_id))
