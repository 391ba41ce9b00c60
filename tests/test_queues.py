"""The actor's byte-bounded queue: backpressure without spinning."""

from __future__ import annotations

import asyncio

from gateway.queues import Queue


async def test_a_put_that_does_not_fit_waits_without_spinning_and_goes_in_once_there_is_room():
    q = Queue(100)
    await q.put("a", 60)
    waiter = asyncio.create_task(q.put("b", 60))  # 120 > 100: waits
    ticks = 0
    for _ in range(20):
        await asyncio.sleep(0)
        ticks += 1
    assert not waiter.done() and ticks == 20  # the loop kept running: the waiting put yields
    assert await q.get() == "a"
    await asyncio.wait_for(waiter, 1)
    assert await q.get() == "b" and q.bytes == 0


async def test_put_nowait_says_when_the_budget_is_passed_and_get_times_out():
    q = Queue(10)
    assert q.put_nowait("x", 10) and not q.put_nowait("y", 1)
    assert await q.get() == "x" and await q.get() == "y"
    assert await q.get(asyncio.get_running_loop().time() + 0.01) is None


async def test_a_deadline_keeps_its_timer_across_gets_and_a_new_one_replaces_it():
    loop = asyncio.get_running_loop()
    q = Queue(10)
    far = loop.time() + 60
    for i in range(3):  # an item comes before the deadline, each time: one timer for all three waits
        loop.call_soon(q.put_nowait, i, 1)
        assert await q.get(far) == i
        timer = q._timer if i == 0 else timer
        assert q._timer is timer and not timer.cancelled()
    near = loop.time() + 0.02
    assert await q.get(near) is None  # the new deadline replaced the old timer, and passed
    assert timer.cancelled() and q._timer is None
    assert loop.time() >= near - 0.002
    loop.call_soon(q.put_nowait, "x", 1)
    assert await q.get(None) == "x" and q._timer is None
