"""What a PostgreSQL test database holds, to compare before and after a command."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kkua_backupd.demo.sandbox import table_contents

if TYPE_CHECKING:
    from tests.conftest import Env


def contents_of(env: Env, dbname: str | None = None) -> dict[str, list[Any]]:
    with env.connect(dbname) as conn:
        return table_contents(conn)
