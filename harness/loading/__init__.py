"""Loading paths: every way a user turns base + adapter into a model, each with a record of what happened."""
