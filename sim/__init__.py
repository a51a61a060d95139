"""A deterministic discrete-event simulator of a peerd network (docs/simulation.md).

N virtual peers live in one process. Each runs the protocol's own sans-IO state machines
(``protocol.machines``) and the protocol's own allocation, award, committee, aggregation
and certificate code; the simulator supplies only what a daemon's I/O would: a virtual
clock, a simulated network (latency, loss, bandwidth, reordering, partitions), simulated
work and injected faults. The same seed replays the same event trace exactly.
"""
