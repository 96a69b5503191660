"""The tiny-shapes task: rendered images of coloured shapes with one-word questions, the shipped model's
architecture and tokenizer, and its held-out evaluation."""
