"""The `fgd` command line: the outermost layer, above fgd_core, workers and service."""
