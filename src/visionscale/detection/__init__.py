"""Object detection: focal / balanced-L1 losses with EAPM, a small anchor-based detector, its training."""
