"""The panda's instruments, as readings of a run directory: hints from the notes, probe and sweep
results, the journal of a branch's decisions, and branch comparisons. Pure functions over the run
store (no torch), shared by the CLI and the page; the trainer side of probes, sweeps and replays
lives with the Run."""
