"""Offline tooling: benchmarks, the soak, checkpoint builders, memory footprint. Nothing here is
imported by the serving processes."""
