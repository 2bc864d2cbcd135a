"""Experts: traces of which experts a MoE model uses per token and layer, and the cache simulator that scores
caching and prefetch policies on them against the offline optimum."""
