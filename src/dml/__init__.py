"""Deep Mutual Learning: a cohort of peers that learn from each other's predictions."""

__version__ = "0.1.0"
