"""Dataset sources: CIFAR-10, MNIST and ImageFolder readers, downloads, synthetic data."""
