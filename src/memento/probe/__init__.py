"""The implicit KV channel of mementos, measured: probing, patching and a fair restart ablation.

`memento probe` runs the whole study (`memento.probe.study`); the pieces are usable alone:
`baseline` (exact text-only Bayes accuracies), `data` (probe sets and label sets split by passcode),
`features` (memento KV under any block semantics), `probes` (batched MLP / linear probes), `stats`
(bootstrap intervals), `patching` (memento KV moved between problems), `ablation` (sampled
generations under memento / restart / fair restart).
"""
