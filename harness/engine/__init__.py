"""The engine: runs the checks in order over the inputs and the loaded models, and owns their cleanup."""
