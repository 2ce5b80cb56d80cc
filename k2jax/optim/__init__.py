"""Optimizers for K2: MuonClip (muon_clip.py) and the aux-loss-free router-bias update (router_bias.py)."""
