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
        publish_from_a_thread(hub, "a", {"type": "failed"})  # after the subscribers left: dropped

    asyncio.run(scenario())


def test_the_job_state_a_late_subscriber_reads_is_never_behind_a_dropped_event() -> None:
    # The order api/jobs.py relies on: the store is written before the event is published, and a
    # follower subscribes before it reads the store, so it either reads the end or receives the event.
    hub = EventHub()
    store = {"status": "running"}

    async def follow() -> str:
        async with hub.subscribe("job") as events:
            if store["status"] != "running":
                return store["status"]
            return (await asyncio.wait_for(events.get(), WAIT_S))["type"]

    async def scenario() -> None:
        hub.attach(asyncio.get_running_loop())

        def finish() -> None:
            store["status"] = "succeeded"
            hub.publish("job", {"type": "succeeded"})

        early = asyncio.create_task(follow())
        await asyncio.sleep(0)  # subscribed, waiting
        await asyncio.to_thread(finish)
        assert await early == "succeeded"
        assert await follow() == "succeeded"  # subscribed after the event: reads the store

    asyncio.run(scenario())
