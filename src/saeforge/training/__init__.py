"""Training: the trainer loop over a stream of activation batches, run folders, sweeps, data-parallel runs, commands."""
