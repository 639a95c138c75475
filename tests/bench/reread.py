#!/usr/bin/env python3
"""CPU per token reread: TokenLifecycle.access_token for users it does not remember.

Section 5 of run.py (10,000 users) is slower than one user only in the rounds
where remembered tokens run out and are read again from Redis. This measures
that read alone, in-process, against the real Redis of the tests
(TEST_REDIS_URL), on uvloop as the proxy runs: `--users` users are seeded under
a fresh prefix and opened once; then each round ends every remembered token's
time, as RECENT_TTL does, and reads them all again.

    .venv/bin/python tests/bench/reread.py                     # CPU us per reread
    .venv/bin/python tests/bench/reread.py --at-once 16        # 16 rereads started together
    .venv/bin/python tests/bench/reread.py --ahead 30          # read ahead, 30 to a store call
    .venv/bin/python tests/bench/reread.py --profile 25        # cProfile, top 25 by own time
    .venv/bin/python tests/bench/reread.py --source /tmp/base  # another tree's proxy/
    .venv/bin/python tests/bench/reread.py --instructions      # instructions per reread (valgrind)

`--at-once N` starts N rereads in the same loop iteration (a wave of N requests
whose tokens ran out together), N at a time; 1 (the default) is one after
another. `--ahead N` reads them ahead instead, as requests that use tokens near
the end of their time have them read (`TokenLifecycle._read_all_ahead`), N to
a store call. CPU is this process's (user + system, `time.process_time`), the
minimum of `--rounds` rounds: other load on the machine only ever adds to it.
`--instructions` counts user-space instructions instead (callgrind: stable
whatever else runs, but blind to the kernel's share, the system calls): the
whole script under callgrind with 1 and with 3 rounds, the difference over 2.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def measure(users: int, rounds: int, at_once: int, profile: int, ahead: int = 0) -> None:
    from proxy.connect.lifecycle import TokenLifecycle, TokenSet, seal
    from proxy.crypto import Keyring
    from proxy.events import ChangeFeed
    from proxy.settings import ServerConfig
    from proxy.stores import Connection
    from proxy.stores.redis import RedisTokenStore, _encode

    prefix = f"kbreread-{secrets.token_hex(4)}"
    keyring = Keyring(secrets.token_urlsafe(48))
    server = ServerConfig(id="oauth", url="http://127.0.0.1:9/mcp", auth="oauth")
    store = RedisTokenStore.from_url(REDIS_URL, prefix=prefix)
    names = [f"u{i}" for i in range(users)]
    try:
        pipe = store.client.pipeline(transaction=False)
        for user in names:
            sealed = seal(keyring, user, server.id, TokenSet(f"at-{user}", f"rt-{user}"))
            conn = Connection(
                user=user, server=server.id, sealed=sealed, issuer="http://127.0.0.1:9", client_id="bench",
                scopes=("mcp",), expires_at=time.time() + 86400, obtained_at=time.time(), version=1,
            )  # fmt: skip
            fields = _encode(conn)
            pipe.hset(
                store._tokens(user, server.id), mapping=dict(zip(fields[::2], fields[1::2], strict=True))
            )
        await pipe.execute()

        async def refresher(*_: object) -> object:
            raise AssertionError("no refresh is due")

        tokens = TokenLifecycle(keyring, store, ChangeFeed(store, store), refresher, 60.0)  # type: ignore[arg-type]

        async def one_round() -> float:
            for key in list(tokens._recent):  # each one's time is up, as RECENT_TTL after it was opened
                entry = tokens._recent[key]
                expired = (0.0, *entry[1:])
                tokens._recent[key] = expired if type(entry) is tuple else type(entry)(*expired)
            started = time.process_time()
            for start in range(0, users, ahead) if ahead else ():
                await tokens._read_all_ahead({(u, server.id): server for u in names[start : start + ahead]})
            if ahead:
                assert all(tokens.remembered(server, u) == f"at-{u}" for u in names)
                return time.process_time() - started
            if at_once == 1:  # as a request does: in its own task, no other
                for user in names:
                    assert await tokens.access_token(server, user) == f"at-{user}"
            for start in range(0, users if at_once > 1 else 0, at_once):
                batch = names[start : start + at_once]
                got = await asyncio.gather(*(tokens.access_token(server, u) for u in batch))
                assert got == [f"at-{u}" for u in batch]
            return time.process_time() - started

        await one_round()  # warm: connections opened, code paths compiled
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await one_round()
            profiler.disable()
            profiler.dump_stats(os.environ.get("REREAD_PROFILE_OUT", os.devnull))
            pstats.Stats(profiler).sort_stats("tottime").print_stats(profile)
            pstats.Stats(profiler).sort_stats("cumtime").print_stats(profile)
            return
        spent = [await one_round() for _ in range(rounds)]
        per = [s / users * 1e6 for s in spent]
        print(
            f"{users} rereads, {f'{ahead} to a call, read ahead' if ahead else f'{at_once} at once'}: "
            f"{min(per):.1f} us CPU per reread "
            f"(min of {rounds}; all: {', '.join(f'{p:.1f}' for p in per)})"
        )
    finally:
        keys = [store._tokens(u, server.id) for u in names]
        for start in range(0, len(keys), 1000):
            await store.client.delete(*keys[start : start + 1000])
        await store.close()


def count_instructions(args: argparse.Namespace) -> None:
    totals = []
    with tempfile.TemporaryDirectory() as work:
        for rounds in (1, 3):
            out = Path(work) / f"callgrind.{rounds}"
            command = [sys.executable, __file__, "--users", str(args.users), "--rounds", str(rounds),
                       "--at-once", str(args.at_once), "--ahead", str(args.ahead)] + (["--source", str(args.source)] if args.source else [])  # fmt: skip
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
                           check=True, capture_output=True)  # fmt: skip
            found = re.findall(r"^totals:\s*(\d+)", out.read_text(errors="replace"), re.MULTILINE)
            totals.append(int(found[-1]))
    per = (totals[1] - totals[0]) / (2 * args.users)
    how = f"{args.ahead} to a call, read ahead" if args.ahead else f"{args.at_once} at once"
    print(f"{args.users} rereads, {how}: {per:,.0f} instructions per reread")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--at-once", type=int, default=1)
    parser.add_argument("--ahead", type=int, default=0, metavar="N", help="read ahead, N to a store call")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile, top N functions")
    parser.add_argument("--source", type=Path, help="a tree whose proxy/ is measured instead of this one")
    parser.add_argument("--instructions", action="store_true", help="count instructions (needs valgrind)")
    args = parser.parse_args()
    if args.instructions:
        count_instructions(args)
        return
    sys.path.insert(0, str(args.source.resolve() if args.source else HERE.parent.parent))
    import uvloop

    uvloop.run(measure(args.users, args.rounds, args.at_once, args.profile, args.ahead))


if __name__ == "__main__":
    main()
