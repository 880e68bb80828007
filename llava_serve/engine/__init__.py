"""The serving engine: requests, scheduler, KV slots, sampler and the loop that owns the model.

Nothing is imported here, so that light modules (sampling parameters) do not pull in torch."""
