"""Running plans: the bound cache and run statistics."""

from boundflow.runtime.cache import BoundCache, CacheKey

__all__ = ["BoundCache", "CacheKey"]
