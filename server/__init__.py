"""The Diffcast update service: publish models and diffs, plan and serve device updates."""
