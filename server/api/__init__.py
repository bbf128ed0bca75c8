"""The HTTP layer: routes per resource, dependencies, and the one error mapping."""
