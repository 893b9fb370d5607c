"""The route table alone: direct wins, the cheapest measured path, dead relays, the way back."""

from fabric._routes import HOP_MS, Routes


def table(alive: set[str]) -> Routes:
    return Routes("me", alive.__contains__, clock=lambda: 0.0)


def test_a_direct_peer_is_always_sent_to_directly_even_when_a_relay_looks_cheaper() -> None:
    routes = table({"peer", "relay"})
    routes.visible("peer", 0, True)
    routes.visible("relay", 0, True)
    for _ in range(3):
        routes.sample("peer", 0.050)  # a slow direct link
    routes.learn("relay", {"peer": 0.0})
    assert routes.path("peer") == ["me", "peer"]


def test_the_cheapest_path_wins_and_clock_offsets_cannot_make_it_lie() -> None:
    routes = table({"r1", "r2", "far"})
    routes.visible("r1", 0, True)
    routes.visible("r2", 0, True)
    # True delays: me-r1 5 ms, r1-far 5 ms; me-r2 10 ms, r2-far 10 ms. r1's clock runs 100 ms
    # ahead of everyone else's, so my sample of r1 comes out negative (5 - 100) and r1's of far
    # too high (5 + 100). Along the path the offsets cancel, and r1's path still wins.
    routes.sample("r1", (5 - 100) / 1e3)
    routes.sample("r2", 10 / 1e3)
    routes.learn("r1", {"far": 5.0 + 100})
    routes.learn("r2", {"far": 10.0})
    assert routes.path("far") == ["me", "r1", "far"]
    assert routes.delay_ms("r1") < 0 < HOP_MS


def test_a_dead_relay_carries_nothing_and_without_relays_there_is_no_route() -> None:
    alive = {"r1", "r2", "far"}
    routes = Routes("me", alive.__contains__, clock=lambda: 0.0)
    for relay in ("r1", "r2"):
        routes.visible(relay, 0, True)
        routes.learn(relay, {"far": 1.0})
    routes.sample("r1", 0.001)
    routes.sample("r2", 0.005)
    assert routes.next_hop("far") == "r1"
    alive.discard("r1")
    routes.invalidate()  # the endpoint does so on every peer event
    assert routes.next_hop("far") == "r2"
    alive.discard("r2")
    routes.invalidate()
    assert routes.path("far") is None


def test_a_node_heard_through_a_relay_can_be_answered_back_that_way_before_any_report() -> None:
    routes = table({"relay", "far"})
    routes.visible("relay", 0, True)
    routes.heard_through_relay("far", "relay")
    assert routes.is_far("far") and routes.path("far") is None
    assert routes.way_back("far") == "relay"
