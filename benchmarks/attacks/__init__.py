"""Privacy attacks that measure what an aggregation server can learn."""
