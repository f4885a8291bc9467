"""Grids shipped with visroute (YAML package data): `visroute study run where-to-prune --db results.sqlite`."""
