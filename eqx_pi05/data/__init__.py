"""Everything between a LeRobot dataset on disk and a model batch.

- `lerobot`: random-access source over LeRobot v2.0 / v2.1 / v3.0 datasets (pyarrow; PyAV for mp4).
- `transforms`: the one per-sample chain (LiberoInputs, views, normalize, resize, tokenize, pad)
  shared by training and the evaluation policy, and `libero_outputs` for the way back.
- `pipeline`: the Grain stream (shuffle, repeat, host sharding, batching, workers, resumable state).
- `data_config`: `DataConfig`; `tokenizer`, `norm_stats`, `images`, `video`: the pieces.
- `make_demo_dataset`, `lerobot_write`: an offline demo dataset with its tokenizer and norm stats
  (its LIBERO-recorded variant is `eqx_pi05.eval.record`, next to the simulator).
"""
