"""Networks: torchvision's registry by name, the user's own factory, weights files and the embedding layer."""
