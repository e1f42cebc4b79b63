"""Monitoring a Muon run: what `MuonMonitor` measures, and the callback."""
