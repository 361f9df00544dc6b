"""Fine-tuning building blocks: the distributed context, resumable state and the loop's parts (``train`` runs them)."""
