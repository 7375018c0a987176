"""Circuits: per-layer and cross-layer transcoders, the local replacement model of one prompt, attribution graphs.

Modules: ``transcoders`` (train a PLT per layer from one LM pass; the manifest and its loader), ``clt`` (the
cross-layer transcoder, its training and folder), ``replacement`` (the frozen linear model of one prompt),
``graph`` (nodes, edges by backward passes), ``prune`` (influence, pruning and the graph scores as pure
functions of one adjacency matrix), ``export`` (the circuit-tracer-style graph JSON), ``commands``
(`saeforge transcoders`, `saeforge clt`, `saeforge graph`), ``sfc`` (Marks-style sparse feature circuits over
SAEs), ``formats`` (circuit-tracer's per-layer transcoder folders), ``sfc_commands`` (`saeforge circuit`,
`saeforge export-transcoders`).
"""
