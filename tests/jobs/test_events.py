"""EventHub: events published on any thread reach the subscribers of their job, from subscription on."""

from __future__ import annotations

import asyncio
import threading

from kleinserve.jobs.events import EventHub

WAIT_S = 10


def publish_from_a_thread(hub: EventHub, job_id: str, event: dict) -> None:
    thread = threading.Thread(target=hub.publish, args=(job_id, event))
    thread.start()
    thread.join()


def test_events_reach_the_jobs_subscribers_in_order_from_subscription_on() -> None:
    hub = EventHub()

    async def scenario() -> None:
        hub.attach(asyncio.get_running_loop())
        publish_from_a_thread(hub, "a", {"type": "queued", "position": 1})  # nobody listens yet: dropped
        async with hub.subscribe("a") as first, hub.subscribe("a", previews=False) as second:
            assert hub.wants_previews("a")
            publish_from_a_thread(hub, "b", {"type": "running"})  # another job's
            for step in (1, 2):
                publish_from_a_thread(hub, "a", {"type": "step", "step": step, "total_steps": 2})
            publish_from_a_thread(hub, "a", {"type": "succeeded"})
            for queue in (first, second):
                events = [await asyncio.wait_for(queue.get(), WAIT_S) for _ in range(3)]
                assert [event["type"] for event in events] == ["step", "step", "succeeded"]
                assert [event.get("step") for event in events] == [1, 2, None]
                assert queue.empty()
        assert not hub.wants_previews("a")

    asyncio.run(scenario())
