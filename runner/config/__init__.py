"""The config side: typed keys, their roles and checks (schema), and the backward.* options each
strategy reads (backward_options). Nothing here imports the training code."""
