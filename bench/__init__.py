"""microgpt-bench: the common spec, the runner, statistics and result files."""
