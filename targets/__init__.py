"""Deployment targets: profiles as data, engine building, device bundles, memory fit."""
