"""hydra-zero-inference's Hydra plugins: the config search path and the process-per-job launcher."""
