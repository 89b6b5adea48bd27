"""backward-lab: seeded training runs that show, with numbers, how a backward strategy behaves."""

__version__ = "0.1.0"
