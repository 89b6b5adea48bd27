"""Ready-made experiments (YAML) and the worked custom-loss example, packaged as runner.experiments."""
