"""The full-study preset `gpu_full` (6 layers, 384 wide, 5000 iterations): a GPU job.
Data only: config.py imports it and registers it in PRESETS."""

GPU_FULL = dict(n_layer=6, n_embd=384, n_head=6, block_size=256, batch_size=64,
                max_iters=5000, eval_interval=500, eval_iters=200, dropout=0.2,
                learning_rate=3e-4)
