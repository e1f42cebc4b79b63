"""QK-Clip (MuonClip): the attention rules, the logit probes, the clip and
its callback."""
