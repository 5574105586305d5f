"""LoopBridge: calls made on one loop run in order on another loop's thread, failures isolated."""

import asyncio
import threading

from server.loop_bridge import LoopBridge


def test_calls_run_in_order_on_the_target_thread_and_a_failure_loses_nothing() -> None:
    target = asyncio.new_event_loop()
    thread = threading.Thread(target=target.run_forever, name="target")
    thread.start()
    seen: list[tuple[int, str]] = []
    done = threading.Event()

    def record(i: int) -> None:
        seen.append((i, threading.current_thread().name))
        if i == 3:
            raise RuntimeError("a failing callback")

    async def source() -> None:
        bridge = LoopBridge(asyncio.get_running_loop(), target)
        for i in range(5):  # one iteration: one batch
            bridge.call(record, i)
        await asyncio.sleep(0)
        for i in range(5, 1000):  # several iterations
            bridge.call(record, i)
            if i % 100 == 0:
                await asyncio.sleep(0)
        bridge.call(done.set)

    try:
        asyncio.run(source())
        assert done.wait(10)
    finally:
        target.call_soon_threadsafe(target.stop)
        thread.join()
        target.close()
    assert [i for i, _ in seen] == list(range(1000))
    assert {name for _, name in seen} == {"target"}
