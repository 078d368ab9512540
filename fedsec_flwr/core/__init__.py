"""Protocol primitives and state machines; this layer imports no Flower code."""
