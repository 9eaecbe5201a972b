"""The `identify` stage (`stage`): open-set 1:N identification. Its configuration (`config`), the trials of the
protocol (`protocol`), rows into search operands (`operands`), what a search of a gallery span leaves per probe
and how spans merge (`state`), the figures and searches.csv of a whole search (`results`), the results and part
folders (`folder`) and the merge of `--rows` parts (`merge`). The search loop itself is the scoring engine's
(`pipeline.scoring.search`)."""
