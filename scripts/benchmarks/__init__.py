"""peerd's benchmark suite (``scripts/bench``): one module per area, each measuring a budget of
docs/design.md §8 and issues 2-4. Benchmarks report; they never pass or fail (no timed assertions).

Areas: ``adverts``, ``tasks``, ``blobs``, ``worker``, ``training``, ``flower``.
"""
