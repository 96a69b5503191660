"""Configuration tables: sharding rules and mesh presets (and, later, fine-tuning runs)."""
