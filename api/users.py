"""`python -m api.users`: the same commands as `wallet-admin` (api/admin.py), under the
name the admin role was first given with."""

from __future__ import annotations

import sys

from api.admin import main

if __name__ == "__main__":
    sys.exit(main())
