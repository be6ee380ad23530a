"""Prefect blocks for hailuo-batch. Register with `prefect block register -m blocks`."""

from blocks.apixo import ApixoCredentials, OutputStorage

__all__ = ["ApixoCredentials", "OutputStorage"]
