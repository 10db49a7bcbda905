"""A tiny training configuration for fast end-to-end tests."""

TINY = [
    "data.dataset=synthetic",
    "data.synthetic_samples=48",
    "data.crop_size=16",
    "data.batch_size=8",
    "mask.patch_size=4",
    "mask.min_keep=0",
    "meta.model_name=vit_tiny",
    "meta.model_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "meta.pred_depth=1",
    "meta.pred_emb_dim=16",
    "optimization.epochs=2",
    "optimization.warmup=1",
    "logging.log_freq=2",
    "logging.probe=false",
    "logging.plots=false",
    "logging.tensorboard=false",
    "meta.use_bfloat16=false",  # fp32: the tests compare paths at fp32 tolerance
]
