"""The model format: config.json, checkpoints (reading and writing), tensor names, typed weights, tokenizer, presets."""
