"""Image decode and augmentation: CPU decode + crop/flip, RandAugment, GPU decode, the device-side batch path."""
