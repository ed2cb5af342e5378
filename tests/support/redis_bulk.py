"""Many mixed Redis keys, fast, for the benchmark and the tests of large captures (not shipped)."""

from __future__ import annotations

import random
from typing import Any

import redis


def fill_bulk(client: redis.Redis, n_keys: int, *, seed: int, batch: int = 5000,
              ttl_fraction: float = 0.1) -> int:
    """Write `n_keys` keys of mixed types (about 60% strings, then hashes, lists, sets, sorted sets) in
    pipelined batches, a fraction of them with a TTL an hour away; returns the number written.

    Deterministic for a given seed. Raises redis.RedisError if the server refuses a write.
    """
    rng = random.Random(seed)
    written = 0
    pipe: Any = client.pipeline(transaction=False)  # redis-py's stubs leave execute_command untyped
    for i in range(n_keys):
        pick = rng.random()
        if pick < 0.6:
            key = f"bulk:s:{i}"
            pipe.execute_command("SET", key, rng.randbytes(rng.randint(8, 200)))
        elif pick < 0.7:
            key = f"bulk:h:{i}"
            pipe.execute_command("HSET", key, *[x for j in range(rng.randint(1, 8)) for x in (f"f{j}", f"v{i}-{j}")])
        elif pick < 0.8:
            key = f"bulk:l:{i}"
            pipe.execute_command("RPUSH", key, *[f"e{j}" for j in range(rng.randint(1, 10))])
        elif pick < 0.9:
            key = f"bulk:set:{i}"
            pipe.execute_command("SADD", key, *[str(rng.randint(0, 1000)) for _ in range(rng.randint(1, 10))])
        else:
            key = f"bulk:z:{i}"
            pipe.execute_command("ZADD", key, *[x for j in range(rng.randint(1, 8))
                                                 for x in (str(rng.random()), f"m{j}")])
        if rng.random() < ttl_fraction:
            pipe.execute_command("EXPIRE", key, 3600)
        written += 1
        if written % batch == 0:
            pipe.execute()
    pipe.execute()
    return written
