"""Pure-PyTorch GSVA (no ROS): config, preprocessing, prompt, model, decoding, checkpoints."""
