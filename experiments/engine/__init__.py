"""The intervention engine: model units (`model_units`), cells run over parts of a dataset through a backend
(`intervention_engine`), experiments that write resumable raw results (`intervention_experiment`), the
generate-and-filter step (`filter_experiment`) and shards over machines (`fleet`)."""
