"""Training: ``python -m mgjax.train`` (cli), its run config (run_config), the loop (loop), the compiled step
(step), AdamW and the losses (optim), checkpoints (checkpoint), what differs per model family (families), FLOPs
(flops) and the plan of a run before renting chips (plan). The top layer.
"""
