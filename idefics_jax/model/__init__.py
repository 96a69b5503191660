"""The model: configs and presets, layers, the vision tower, the connectors, the decoder with its cache, the
vision-language model, and the logical-axis sharding of its parameters."""
