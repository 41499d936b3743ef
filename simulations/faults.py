"""Scheduled faults and background loss: outages, partitions, flash crowds, swizzle-clog, resets.

Each scheduled event waits for its time (absolute, or a share of the run) and then acts on the
world through the same handles churn uses: the virtual network (partition, clog, reset) and the
swarm (kill), and the relays (`simulations.nat`). Every action goes into the trace.
"""

from __future__ import annotations

import trio

from simulations import churn
from simulations.scenario import Event
from simulations.users import User


async def run_event(world, event: Event) -> None:
    await trio.sleep_until(event.at.resolve(world.scenario.duration_s))
    handlers = {"datacenter-outage": datacenter_outage, "partition": partition,
                "flash-crowd": flash_crowd, "swizzle-clog": swizzle_clog, "mass-departure": mass_departure,
                "relay-failure": relay_failure}
    await handlers[event.kind](world, event)


async def datacenter_outage(world, event: Event) -> None:
    """Every data-center (bootstrap) host is gone at once, for good."""
    cloud = [h for h in world.swarm.hosts.values() if h.kind == "cloud"]
    world.trace.record("datacenter_outage", hosts=len(cloud))
    world.mark("datacenter outage")
    for host in cloud:
        world.swarm.kill(host)


async def mass_departure(world, event: Event) -> None:
    """A share of the household hosts leave at once (drained), for good; the world then watches
    how long the rest take to cover every block again."""
    households = [h for h in world.swarm.live() if h.kind == "household"]
    leaving = world.rng("departure").sample(households, round(event.share * len(households)))
    world.trace.record("mass_departure", hosts=len(leaving))
    world.mark(f"{len(leaving)} hosts leave")
    for host in leaving:
        world.swarm.depart(host)
    await world.watch_coverage(f"after {len(leaving)} of {len(households)} hosts left")


async def relay_failure(world, event: Event) -> None:
    """Relays (`[nat] relays`) die at once, for good: those holding the most slots, `hosts` of them (1)."""
    killed = world.nat.kill_relays(event.hosts or 1)
    world.trace.record("relay_failure", relays=killed)
    world.mark(f"relay failure: {', '.join(killed) or 'none left'}")


async def partition(world, event: Event) -> None:
    """The event's regions cannot reach the others for the event's duration."""
    regions = event.regions or (sorted(world.scenario.regions)[0],)
    pairs = world.network.partition(regions, world.scenario.regions)
    world.trace.record("partition", regions=list(regions))
    world.mark(f"partition {'+'.join(regions)}")
    await trio.sleep(event.duration.resolve(world.scenario.duration_s))
    world.network.heal(pairs)
    world.trace.record("partition_healed", regions=list(regions))
    world.mark("healed")


async def flash_crowd(world, event: Event) -> None:
    """Extra users, all at once, asking often, for the event's duration."""
    until = trio.current_time() + event.duration.resolve(world.scenario.duration_s)
    think = event.think.resolve(world.scenario.duration_s)
    count = event.clients or round(event.crowd * world.scenario.clients.count)
    world.trace.record("flash_crowd", users=count)
    world.mark(f"flash crowd +{count}")
    rng = world.rng("flash-crowd")
    for index in range(count):
        region = churn.weighted_choice(rng, world.scenario.regions)
        user = User(world, f"fc{index}", region, think_s=think, until=until)
        world.user_nursery.start_soon(user.run)


async def swizzle_clog(world, event: Event) -> None:
    """Hosts' links stopped one by one, then restored one by one in another random order."""
    rng = world.rng("swizzle")
    interval = event.interval.resolve(world.scenario.duration_s)
    peers = [h.peer_id for h in world.swarm.live()]
    clog, restore = churn.swizzle_order(peers, event.hosts or max(1, len(peers) // 5), rng)
    world.mark("swizzle-clog")
    for peer in clog:
        world.network.clog(peer)
        world.trace.record("clog", peer=peer)
        await trio.sleep(interval)
    await trio.sleep(event.duration.resolve(world.scenario.duration_s))
    for peer in restore:
        world.network.unclog(peer)
        world.trace.record("unclog", peer=peer)
        await trio.sleep(interval)


async def connection_resets(world, until: float) -> None:
    """Loss as reset: connections dropped at random (a Poisson process), whatever they carry."""
    rate = world.scenario.network.resets_per_hour / 3600.0
    if rate <= 0:
        return
    rng = world.rng("resets")
    while True:
        at = trio.current_time() + rng.expovariate(rate)
        if at >= until:
            return
        await trio.sleep_until(at)
        streams = world.network.open_streams()
        if streams:
            victim = rng.choice(streams)
            count = world.network.reset_streams(victim.local, victim.peer_id)
            world.trace.record("connection_reset", between=sorted((victim.local, victim.peer_id)), streams=count)
