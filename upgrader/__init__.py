"""Code shared by the trainer, the model store and the service: architectures and image math."""
