"""The `score` stage (`stage`) and its parts: the configuration (`config`), what a pair's score is
(`definition`), row sources (`sources`: rows in memory, `memory`; read from the store in blocks, `rows`, in label
order, `sorted_rows`), the one all-pairs path (`all_pairs`) over the one tile loop (`tiles`, with `tile_pairs`,
`counting` and the block arithmetic of `blockmath`), the pairs a store lists (`listed`), rank-1 identification
(`rank1`), the exact AUC (`exact`), `--rows` parts added up (`merge`) and the results' fields (`assemble`)."""
