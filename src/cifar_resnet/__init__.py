"""A reproducible CIFAR-10 ResNet recipe: the library behind the DVC stages in stages/."""
