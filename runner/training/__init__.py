"""The training side: config -> objects (build: data, models, losses, optimizers, strategies), the
checks before training, the strategies, and the loop with its step log and the subscribers of its events
(sinks, trackers, checkpoints, the step's watchers: runner.recording.events)."""
