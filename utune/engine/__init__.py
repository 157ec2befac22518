"""The engine's records: what a build returns (:mod:`utune.engine.record`)."""
