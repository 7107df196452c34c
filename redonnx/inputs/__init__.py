"""What the model's inputs hold, settled once: kinds, sizes, shapes, how to draw them, how realistic the draws are."""
