"""Deciding and running: node daemon, orchestrator, task graph, scenarios and the `flowloom` CLI."""
