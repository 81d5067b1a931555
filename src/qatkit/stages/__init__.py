"""Pipeline stages: finetune -> convert -> eval, then report."""
