"""The lstmeng asv suite: one module per area, shared pieces in ``common``."""
