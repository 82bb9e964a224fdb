"""Running the engine: the scn-landmarks command line and the background worker process."""
