"""Model lifecycle: which version answers a request, and how that changes over time.

- `traffic`: the shared traffic state (splits, shadows, deployments, A/B tests) in Redis or on disk.
- `manager`: each worker's `LifecycleManager`, which applies that state and drives rollouts.
- `stats`: per-version request, latency and score statistics that rollouts and A/B tests judge.
- `ab_stats`: significance tests over two arms' statistics.
"""
