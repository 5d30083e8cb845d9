"""Serving: the KServe model (a kserve.Model subclass), its entry point, and a client."""
