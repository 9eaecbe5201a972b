"""Scoring parts: rows held in memory as a tile source (`memory`), the exact AUC (`exact`), the pairs a store
lists (`listed`), rank-1 identification (`rank1`). The stage is `pipeline.scoring.stage`; the tile loop `pipeline.scoring.tiles`;
rows read from the store in blocks `pipeline.scoring.rows`."""
