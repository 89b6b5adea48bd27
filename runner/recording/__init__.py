"""What is recorded: the record format, sinks, the step log, trackers, checkpoints (subscribers of the loop's events)."""
