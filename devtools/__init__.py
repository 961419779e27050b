"""Development and test tooling: embedded servers, `make run`'s stack, process and polling
helpers, the ledger replay. Used by the tests and `load/`; never shipped in the images, and
never imported by `api`, `worker` or `shared` (tests/test_layout.py holds them to it)."""
