"""Reading checkpoints and sample files, writing safetensors and output directories."""
