"""The served OpenAPI document generates a typed client: openapi-python-client makes one
from /api/openapi.json of a running API (with authentication on, as the shipped stack
runs), into a temporary directory, and the test uses it as a user would, through its
models and functions only. Every answer is parsed into its model; the generator must give
no warning (a part of the document it could not model)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from api.app import create_app
from shared.settings import Settings
from tests.conftest import AiohttpClient
from worker.worker import Worker

PACKAGE = "wallet_service_client"
# The generated code is used as written: no formatter run after generating (the default
# post-hooks run ruff, which need not be on PATH).
CONFIG = f"package_name_override: {PACKAGE}\npost_hooks: []\n"


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, auth_enabled=True, jwt_secret="client-" + "k" * 40)


@pytest.fixture
async def served(aiohttp_client: AiohttpClient, auth_settings: Settings, worker: Worker) -> str:
    """The base URL of an API with a worker behind it, on a loopback port."""
    api = await aiohttp_client(create_app(auth_settings))
    return str(api.make_url("")).rstrip("/")


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[Path]:
    """Where the client is written; its modules are forgotten afterwards."""
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


async def generate(base: str, into: Path) -> None:
    config = into / "generator.yaml"
    config.write_text(CONFIG)
    run = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--url",
            f"{base}/api/openapi.json",
            "--config",
            str(config),
            "--meta",
            "none",
            "--output-path",
            str(into / PACKAGE),
            "--fail-on-warning",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def module(name: str) -> ModuleType:
    return importlib.import_module(f"{PACKAGE}.{name}")


async def answer(endpoint: ModuleType, status: int, model: type, **kwargs: Any) -> Any:
    """Calls the generated endpoint; its answer has `status` and is parsed into `model`."""
    response = await endpoint.asyncio_detailed(**kwargs)
    assert response.status_code == status, response.content
    assert isinstance(response.parsed, model), response.parsed
    return response.parsed


async def test_a_generated_client_registers_operates_transfers_and_reads_back(
    served: str, generated: Path
) -> None:
    await generate(served, generated)
    client_module, models = module("client"), module("models")
    auth, wallets = module("api.auth"), module("api.wallets")
    operations, transfers = module("api.operations"), module("api.transfers")

    def endpoint(group: ModuleType, name: str) -> ModuleType:
        return importlib.import_module(f"{group.__name__}.{name}")

    credentials = models.Credentials(
        username=f"client-{uuid.uuid4().hex[:8]}", password="a long enough password"
    )
    async with client_module.Client(base_url=served) as anonymous:
        user = await answer(
            endpoint(auth, "register_user"), 201, models.User, client=anonymous, body=credentials
        )
        assert user.username == credentials.username
        assert isinstance(user.id, uuid.UUID)
        tokens = await answer(
            endpoint(auth, "create_token"), 200, models.Tokens, client=anonymous, body=credentials
        )
        assert tokens.token_type == models.TokensTokenType.BEARER
        # Without the token, the wallets are closed; the refusal is a parsed problem.
        refused = await answer(
            endpoint(wallets, "create_wallet"), 401, models.Problem, client=anonymous
        )
        assert refused.status == 401

    async with client_module.AuthenticatedClient(
        base_url=served, token=tokens.access_token
    ) as client:
        create_wallet = endpoint(wallets, "create_wallet")
        payer = await answer(create_wallet, 201, models.Wallet, client=client)
        payee = await answer(create_wallet, 201, models.Wallet, client=client)
        assert (payer.balance, payee.balance) == ("0.00", "0.00")
        assert isinstance(payer.id, uuid.UUID)

        operate = endpoint(operations, "post_operation")
        deposit = models.OperationRequest(
            operation_type=models.OperationType.DEPOSIT, amount="10.25"
        )
        key = str(uuid.uuid4())
        deposited = await answer(
            operate,
            200,
            models.Operation,
            wallet_id=payer.id,
            client=client,
            body=deposit,
            idempotency_key=key,
        )
        assert deposited.status == models.OperationStatus.APPLIED
        assert deposited.operation_type == models.OperationOperationType.DEPOSIT
        assert (deposited.amount, deposited.balance) == ("10.25", "10.25")
        replayed = await answer(
            operate,
            200,
            models.Operation,
            wallet_id=payer.id,
            client=client,
            body=deposit,
            idempotency_key=key,
        )
        assert (replayed.id, replayed.balance) == (deposited.id, "10.25")

        withdraw = models.OperationRequest(
            operation_type=models.OperationType.WITHDRAW, amount="3.10"
        )
        withdrawn = await answer(
            operate, 200, models.Operation, wallet_id=payer.id, client=client, body=withdraw
        )
        assert (withdrawn.operation_type, withdrawn.balance) == (
            models.OperationOperationType.WITHDRAW,
            "7.15",
        )
        too_much = models.OperationRequest(
            operation_type=models.OperationType.WITHDRAW, amount="100.00"
        )
        refused = await answer(
            operate, 409, models.Problem, wallet_id=payer.id, client=client, body=too_much
        )
        assert refused.type_ == "urn:wallet-service:problem:insufficient-funds"
        assert refused.operation.reason == models.OperationReasonType0.INSUFFICIENT_FUNDS

        sent = await answer(
            endpoint(transfers, "create_transfer"),
            200,
            models.Transfer,
            client=client,
            body=models.TransferRequest(from_=payer.id, to=payee.id, amount="2.15"),
        )
        assert sent.status == models.TransferStatus.COMPLETED
        assert (sent.from_, sent.to, sent.amount, sent.balance) == (
            payer.id,
            payee.id,
            "2.15",
            "5.00",
        )
        looked_up = await answer(
            endpoint(transfers, "get_transfer"),
            200,
            models.Transfer,
            transfer_id=sent.id,
            client=client,
        )
        assert (looked_up.id, looked_up.status) == (sent.id, models.TransferStatus.COMPLETED)

        get_wallet = endpoint(wallets, "get_wallet")
        payer_now = await answer(get_wallet, 200, models.Wallet, wallet_id=payer.id, client=client)
        payee_now = await answer(get_wallet, 200, models.Wallet, wallet_id=payee.id, client=client)
        assert (payer_now.balance, payee_now.balance) == ("5.00", "2.15")

        listed = await answer(
            endpoint(wallets, "list_wallets"), 200, models.WalletPage, client=client, limit=100
        )
        assert {payer.id, payee.id} <= {w.id for w in listed.items}

        ledger = await answer(
            endpoint(operations, "list_operations"),
            200,
            models.OperationPage,
            wallet_id=payer.id,
            client=client,
        )
        assert all(isinstance(o, models.Operation) for o in ledger.items)
        kinds = models.OperationOperationType
        assert [(o.operation_type, o.status.value, o.amount, o.balance) for o in ledger.items] == [
            (kinds.TRANSFER_OUT, "applied", "2.15", "5.00"),
            (kinds.WITHDRAW, "rejected", "100.00", "7.15"),
            (kinds.WITHDRAW, "applied", "3.10", "7.15"),
            (kinds.DEPOSIT, "applied", "10.25", "10.25"),
        ]
        assert ledger.next_cursor is None
        out = ledger.items[0]
        assert (out.transfer_id, out.counterparty) == (sent.id, payee.id)

        one = await answer(
            endpoint(operations, "get_operation"),
            200,
            models.Operation,
            wallet_id=payer.id,
            operation_id=deposited.id,
            client=client,
        )
        assert (one.id, one.seq, one.balance) == (deposited.id, 1, "10.25")
