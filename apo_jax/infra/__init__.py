"""Plumbing: device meshes and sharding rules, multi-host start-up, checkpoints, metrics files."""
