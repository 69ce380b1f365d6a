"""Image input for vision models (docs/vision.md): `images` (loading and checking image
sources), `inputs` (the multimodal items a prompt carries into the engine), `messages` (image
parts of chat messages, in order)."""
