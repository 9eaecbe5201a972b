"""Face-verification pipeline: LFW data, ImageNet backbones, embedding stores, scoring, fine-tuning."""
