"""Execution units: how a strategy's passes run, each built once from the config and called by
strategies and the loop alike: precision, the parallel engines (none, DDP, FSDP2) and their
processes, activation recomputation and the saved-tensor meter."""
