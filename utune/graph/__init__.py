"""The graph engine: tracing, sites, selection, rewriting passes, inspection."""
