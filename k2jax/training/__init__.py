"""The training job's pieces (train.py is only flags): data, the jitted step, checkpoints, metrics, the loop."""
