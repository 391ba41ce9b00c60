"""kill -9 at random moments, with store writes in flight: nothing lost, nothing doubled.

Clients converse without pause (typed turns, one after another) with one gateway. Trial after trial
it is killed with SIGKILL (no drain, no flush) at a moment drawn from a seeded RNG: at a random time,
or just as a client receives a final transcript, while that item's store write is in flight. A new
process starts on the same port, store and secret; the clients reconnect by themselves and resume
with their resume token and the receipts not yet acknowledged. At the end every item a client was
ever given a final transcript for (and so a receipt), or saw saved, is read back from the store: it
is there exactly once, with the text the client got; no user turn is stored twice.

Set NOVAGATE_KILL9_SEED to replay a run (the seed is printed); NOVAGATE_KILL9_TRIALS for more.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter


from gateway.client import TurnInterrupted, VoiceClient

from .test_rolling_update import PinnedGateway, stored_items

SECRET = "kill9-test-secret-0123456789abcdef0123456789"
CLIENTS = 5
TRIALS = int(os.environ.get("NOVAGATE_KILL9_TRIALS", "0")) or None   # default: per backend, below
BUDGET_S = {"local": 46.0, "aws": 28.0}   # trials stop early when the budget is spent (>= MIN_TRIALS run)
DEFAULT_TRIALS = {"local": 20, "aws": 12}
MIN_TRIALS = 8


def _text(i: int, n: int) -> str:
    return f"Thank you, client {i}, turn {n}" if n % 4 else f"Hello there, client {i}, turn {n}"


async def test_kill9_loses_and_doubles_nothing(backend, tmp_path):
    kind = "aws" if backend.get("NOVAGATE_STORE") == "agent-runtime" else "local"
    seed = int(os.environ.get("NOVAGATE_KILL9_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\n[kill -9, {kind}] seed {seed} (replay with NOVAGATE_KILL9_SEED={seed})")
    rng = random.Random(seed)
    env = {**backend, "NOVAGATE_SECRET": SECRET, "NOVAGATE_SQLITE_PATH": str(tmp_path / "novagate.db")}
    if kind == "local":
        env["NOVAGATE_ENGINE_TRACE"] = ""
    (tmp_path / "gw").mkdir()
    gw = PinnedGateway(tmp_path / "gw", env).start()

    armed = asyncio.Event()   # kill on the next final transcript (from inside the client's reader)
    killed = asyncio.Event()

    def on_message(msg: dict) -> None:
        if armed.is_set() and msg.get("type") == "transcript" and msg.get("final"):
            armed.clear()
            gw.proc.kill()        # SIGKILL: the item's store write is in flight, the client has the receipt
            killed.set()

    clients = [VoiceClient(gw.ws, reconnect=True, output_rate=16000, on_message=on_message,
                           backoff_initial=0.05, backoff_max=0.4, reconnect_timeout=90,
                           rng=random.Random(rng.random())) for _ in range(CLIENTS)]
    stop = asyncio.Event()
    turns = Counter()
    sent: list[list[str]] = [[] for _ in clients]  # every text each client sent

    async def converse(i: int, c: VoiceClient) -> None:
        """Turn after turn; once the kills are over, until one more turn has completed."""
        n = 0
        while True:
            n += 1
            sent[i].append(_text(i, n))
            try:
                await c.turn(text=_text(i, n), timeout=60)
                turns["completed"] += 1
                if stop.is_set():
                    return
            except TurnInterrupted as e:
                turns["interrupted (user heard)" if e.user_heard else "interrupted (user not heard)"] += 1

    trials = TRIALS or DEFAULT_TRIALS[kind]
    t0 = time.monotonic()
    log: list[dict] = []
    loops: list[asyncio.Task] = []
    try:
        await asyncio.gather(*(c.connect(mic=False) for c in clients))
        conversations = [c.state.conversation_id for c in clients]
        loops = [asyncio.create_task(converse(i, c)) for i, c in enumerate(clients)]
        for trial in range(trials):
            if trial >= MIN_TRIALS and time.monotonic() - t0 > BUDGET_S[kind]:
                break
            generations = [c.generation for c in clients]
            when = rng.choice(("random", "on-final"))
            if when == "random":
                await asyncio.sleep(rng.uniform(0.05, 2.0))
            else:  # just as a final transcript arrives
                await asyncio.sleep(rng.uniform(0.0, 1.2))
                killed.clear()
                armed.set()
                try:
                    await asyncio.wait_for(killed.wait(), 6)
                except TimeoutError:
                    armed.clear()
                    when = "random (no final came)"
            gw.kill()
            pending = sum(len(c.state.pending) for c in clients)
            t_kill = time.monotonic()
            await asyncio.to_thread(gw.start)
            t_up = time.monotonic()
            for i, c in enumerate(clients):
                await c.wait_for(lambda c=c, g=generations[i]: c.generation > g and c.connected, 60)
                assert c.ready["resumed"], f"seed {seed} trial {trial}: client {i} did not resume: {c.ready}"
            log.append({"when": when, "pending_at_kill": pending, "restart_s": t_up - t_kill,
                        "resumed_s": time.monotonic() - t_kill})
        stop.set()  # every client completes one more turn on the last process, then stops
        await asyncio.wait_for(asyncio.gather(*loops), 90)

        problems: dict[int, list[str]] = {}
        unseen = 0
        for i, c in enumerate(clients):
            assert c.state.conversation_id == conversations[i] or kind == "aws"  # (agent-runtime may move it)
            assert not c.state.pending, f"seed {seed}: client {i}: receipts never acknowledged"
            stored = await asyncio.to_thread(stored_items, env, tmp_path, c.state.conversation_id)
            counts = Counter(x["item_id"] for x in stored)
            by_id = {x["item_id"]: x for x in stored}
            finals = {f["item_id"]: f for f in c.finals if f.get("receipt")}
            p = []
            for item_id in sorted(set(finals) | c.saved):
                if counts[item_id] != 1:
                    p.append(f"{item_id} ({finals.get(item_id, {}).get('text')!r}): stored {counts[item_id]} times")
                elif item_id in finals and by_id[item_id]["text"] != finals[item_id]["text"]:
                    p.append(f"{item_id}: stored {by_id[item_id]['text']!r}, final was {finals[item_id]['text']!r}")
            p += [f"{item_id}: doubled" for item_id, n in counts.items() if n > 1]
            user_texts = Counter(x["text"] for x in stored if x["role"] == "user")
            p += [f"user turn {t!r} stored {n} times" for t, n in user_texts.items() if n > 1]
            p += [f"stored user turn {t!r} was never sent" for t in user_texts if t not in sent[i]]
            if p:
                problems[i] = p
            unseen += len(set(counts) - set(finals) - c.saved)
        assert not problems, f"seed {seed}: {problems}"

        recs = [r for c in clients for r in c.reconnects]
        finals_total = sum(len(c.finals) for c in clients)
        kinds = dict(Counter(x["when"].split()[0] for x in log))
        print(f"  {len(log)} kills in {time.monotonic() - t0:.1f} s: {kinds}; "
              f"receipts unacknowledged at the kill: {sum(x['pending_at_kill'] for x in log)} "
              f"(max {max(x['pending_at_kill'] for x in log)} in one trial)")
        print(f"  turns {dict(turns)}; {finals_total} final items checked, exactly once each; "
              f"{unseen} stored items no client saw final (stored, then killed before the transcript went)")
        print(f"  restart {max(x['restart_s'] for x in log):.2f} s max; kill -> all resumed: max "
              f"{max(x['resumed_s'] for x in log):.2f} s; {len(recs)} reconnects, all resumed; "
              f"lost sockets closed with {dict(Counter(r.close_code for r in recs))}")
    finally:
        stop.set()
        for t in loops:
            t.cancel()
        for c in clients:
            await c.close()
        gw.stop()
