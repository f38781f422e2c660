"""File formats the architecture folders read weights from: Hugging Face folders and PyTorch checkpoints."""
