"""HTTP routers: upscale (the product), models (what is served, admin), ops (health, metrics)."""
